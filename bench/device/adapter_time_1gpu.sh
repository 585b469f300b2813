# Time to a trained adapter (issue 22) on a single-GPU lease: the adapter-time arms of the rounds' commit (the
# ac496ac export in .devw/gt; this script came later, so it runs from a later export in .devw/gh).
# Carry .devw/gt .devw/gh .devw/whl-train. Call: bash .devw/gh/tree/bench/device/adapter_time_1gpu.sh \
#   "lorad_compiled lorad_eager" $PWD/.devw     (~18 min; another lease: stock_liger, ~14 min)
# Then collect: bash /root/tree/bench/device/collect.sh 1 560 (twice or thrice; adapter.done marks the end).
set -u
ARMS=${1:?arms}
D=${2:?usage: adapter_time_1gpu.sh ARMS ABSOLUTE_DEVW_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$D"/whl-train/*.whl || exit 4
rm -rf /root/tree && cp -r "$D/gt/tree" /root/tree || exit 1
mkdir -p /root/res && cp /root/tree/COMMIT /root/res/commit.txt
nvidia-smi --query-gpu=index,name,memory.total --format=csv > /root/res/gpus.txt; lscpu > /root/res/lscpu.txt
cat > /root/chain.sh <<CHAIN
export PYTHONPATH=/tmp/site:/root/tree PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd /root/tree && export LORAD_BENCH_COMMIT=\$(cat COMMIT)
python3 -c "from pathlib import Path; from bench.train_speed import ensure_7b_checkpoint as e; e(Path('/root/ckpt7b'))"
for a in $ARMS; do python3 -m bench.train_speed adapter-time \$a --json /root/res/adapter_\$a.json \
  --ckpt-dir /root/ckpt7b > /root/res/adapter_\$a.log 2>&1; done
echo done > /root/res/adapter.done
CHAIN
setsid bash /root/chain.sh > /root/res/chain.log 2>&1 < /dev/null &
sleep 15; ls /root/res
