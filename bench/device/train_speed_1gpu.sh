#!/usr/bin/env bash
# Issue 22's training-speed rounds on ONE GPU (nvidia-h100-x1 or nvidia-h200, the kinds lent when no multi-GPU
# kind is): every arm of `bench.train_speed rounds` on the one card, one after another, in the background. One
# round of the 7B arms takes ~10-12 min on an H100, so a 30-minute lease holds one round; leases at the same
# commit add rounds (--first-round R continues the order's rotation), and `python -m bench.train_speed
# merge-rounds` joins them into bench/results/train_speed.json.
#
# Once, here: bash bench/device/export.sh (or `git archive COMMIT` into .devw/gb/tree for a later round of an
# earlier commit, with that commit in its COMMIT), copied to .devw/gt/tree without tests/ and bench/results/ (the
# wheels and the tree must fit the 64 MiB a call carries), and the wheels of train_speed_gpu.sh's header in
# .devw/whl-train (bitsandbytes, liger-kernel).
# Call 1 (carry .devw/gt .devw/whl-train): bash .devw/gt/tree/bench/device/train_speed_1gpu.sh $PWD/.devw ROUND
# Calls 2, 3 (no carry): bash /root/tree/bench/device/collect.sh 1 560 (the round), then collect.sh 2 300 (the
# profile of lorad's step that follows it: bench/profile_train.py, ~2 min)
set -u
DEVW=${1:?usage: train_speed_1gpu.sh ABSOLUTE_DEVW_DIR ROUND}
ROUND=${2:?usage: train_speed_1gpu.sh ABSOLUTE_DEVW_DIR ROUND}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$DEVW"/whl-train/*.whl || exit 4
rm -rf /root/tree && cp -r "$DEVW/gt/tree" /root/tree && cd /root/tree || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LORAD_BENCH_COMMIT=$(cat COMMIT)
mkdir -p /root/res && cp COMMIT /root/res/commit.txt
nvidia-smi --query-gpu=index,name,memory.total --format=csv > /root/res/gpus.txt; lscpu > /root/res/lscpu.txt
# rounds saves the 7B checkpoint (the 8-bit seed arm loads it from disk) before its first arm.
setsid bash -c "python3 -m bench.train_speed rounds --out /root/res/train_speed_round$ROUND --gpus 0 --rounds 1 \
  --first-round $ROUND --steps 30 --warmup 3 --ckpt-dir /root/ckpt7b; echo \"exit \$?\" > /root/res/rounds.done; \
  python3 -m bench.profile_train --out /root/res/profile_train.json > /root/res/profile_train.log 2>&1; \
  echo \"exit \$?\" > /root/res/profile.done" > /root/res/rounds.log 2>&1 < /dev/null &
sleep 20; ls /root/res; tail -3 /root/res/rounds.log
