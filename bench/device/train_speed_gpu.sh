#!/usr/bin/env bash
# Issue 22's training-speed measurements and the GPU test tier on the device tool, in one lease of
# nvidia-h100-x8 (or -x4: fewer lanes, same arms). Everything runs in the background (a call lasts at most
# 10 minutes); collect.sh brings the results back.
#
# Once, here (all git-ignored):
#   echo /.devw/ >> .git/info/exclude; bash bench/device/export.sh      # clean tree of HEAD in .devw/gb/tree
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .devw/whl-train bitsandbytes==0.50.2 liger-kernel==0.8.5 pytest pluggy iniconfig   # ~45 MB
# Call 1 (kind nvidia-h100-x8, carry .devw/gb .devw/whl-train):
#   bash .devw/gb/tree/bench/device/train_speed_gpu.sh $PWD/.devw
# Calls 2, 3 (no carry), back to back until the 3 jobs are done (~20 min in all):
#   bash /root/tree/bench/device/collect.sh 3 560
# Then here: res.tgz holds train_speed_rounds/rounds.json (the arms), adapter_*.json (time to a trained
# adapter), gpu_tests.log (make test-gpu's log, to commit with the results) and each job's log.
set -u
DEVW=${1:?usage: train_speed_gpu.sh ABSOLUTE_DEVW_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$DEVW"/whl-train/*.whl || exit 4
# Jobs run from a copy: the next call re-syncs the carried folder under their feet.
rm -rf /root/tree && cp -r "$DEVW/gb/tree" /root/tree && cd /root/tree || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LORAD_BENCH_COMMIT=$(cat COMMIT)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /root/res && cp COMMIT /root/res/commit.txt
nvidia-smi --query-gpu=index,name,memory.total --format=csv > /root/res/gpus.txt; lscpu > /root/res/lscpu.txt
G=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
[ "$G" -ge 4 ] || { echo "needs 4 or more GPUs, found $G"; exit 2; }

bg() {   # bg NAME COMMAND: every stream to /root/res/NAME.log, NAME.done when it ends
  local name=$1; shift
  setsid bash -c "$*; echo \"exit \$?\" > /root/res/$name.done" > /root/res/$name.log 2>&1 < /dev/null &
}
# The 7B-shaped checkpoint (13 GB) the 8-bit seed arm and the adapter-time arms load from disk, saved once first.
python3 -c "from pathlib import Path; from bench.train_speed import ensure_7b_checkpoint as e; e(Path('/root/ckpt7b'))" \
  > /root/res/checkpoint.log 2>&1 || { tail -5 /root/res/checkpoint.log; exit 3; }

LANES=$(seq -s, 0 $((G - 4)))          # all but the last 3 GPUs: the arms in 3 interleaved rounds
A=$((G - 3)); B=$((G - 2)); C=$((G - 1))
bg rounds "python3 -m bench.train_speed rounds --out /root/res/train_speed_rounds --gpus $LANES --rounds 3 \
  --steps 30 --warmup 3 --ckpt-dir /root/ckpt7b"
T="python3 -m bench.train_speed adapter-time"
bg adapter_compiled "CUDA_VISIBLE_DEVICES=$A $T lorad_compiled --json /root/res/adapter_lorad_compiled.json --ckpt-dir /root/ckpt7b"
# The GPU tier first on two GPUs (FSDP needs both), then the other two adapter-time arms on them.
bg gpu_tests_then_adapters "CUDA_VISIBLE_DEVICES=$B,$C python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -rA \
  > /root/res/gpu_tests.log 2>&1; \
  CUDA_VISIBLE_DEVICES=$B $T lorad_eager --json /root/res/adapter_lorad_eager.json --ckpt-dir /root/ckpt7b & \
  CUDA_VISIBLE_DEVICES=$C $T stock_liger --json /root/res/adapter_stock_liger.json --ckpt-dir /root/ckpt7b; wait"
sleep 5; ls /root/res; tail -3 /root/res/*.log
