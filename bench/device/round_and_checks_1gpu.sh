# A single-GPU lease for issue 22: one training-speed round from the rounds' commit plus the checks beside it.
# Carry: .devw/gt (the ac496ac export: the rounds, the QLoRA pair), .devw/gh (a later export: the flex arms, the profile
# A/B), .devw/whl-train, .devw/ref (a copy of ../shared/reference/strong_stock.py, the issue's own script).
# Call: bash .devw/gh/tree/bench/device/round_and_checks_1gpu.sh ROUND $PWD/.devw   (ROUND 1, then 2)
# then: bash /root/tree/bench/device/collect.sh 1 560 ; collect.sh 6 500 (rounds, qlora, flex, ref, profile, nodrop .done)
set -u
ROUND=${1:?round}
D=${2:?usage: round_and_checks_1gpu.sh ROUND ABSOLUTE_DEVW_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$D"/whl-train/*.whl || exit 4
rm -rf /root/tree /root/treeh /root/ref && cp -r "$D/gt/tree" /root/tree && cp -r "$D/gh/tree" /root/treeh \
  && cp -r "$D/ref" /root/ref || exit 1
mkdir -p /root/res && cp /root/tree/COMMIT /root/res/commit.txt
nvidia-smi --query-gpu=index,name,memory.total --format=csv > /root/res/gpus.txt; lscpu > /root/res/lscpu.txt
cat > /root/chain.sh <<CHAIN
export PYTHONPATH=/tmp/site:/root/tree PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd /root/tree && LORAD_BENCH_COMMIT=\$(cat COMMIT) python3 -m bench.train_speed rounds \
  --out /root/res/train_speed_round$ROUND --gpus 0 --rounds 1 --first-round $ROUND --steps 30 --warmup 3 \
  --ckpt-dir /root/ckpt7b > /root/res/rounds.log 2>&1; echo "exit \$?" > /root/res/rounds.done
LORAD_BENCH_COMMIT=\$(cat COMMIT) python3 -m bench.train_speed gpu --cases qlora_stock,qlora_lorad --out /root/res/qlora \
  --ckpt-dir /root/ckpt7b > /root/res/qlora.log 2>&1; echo "exit \$?" > /root/res/qlora.done
export PYTHONPATH=/tmp/site:/root/treeh
cd /root/treeh && for a in stock_flat_flex_liger stock_flat_flex; do LORAD_BENCH_COMMIT=\$(cat COMMIT) timeout 600 \
  python3 -m bench.train_speed arm \$a --json /root/res/arm_\$a.json --steps 30 --warmup 3 --ckpt-dir /root/ckpt7b \
  > /root/res/arm_\$a.log 2>&1; done; echo done > /root/res/flex.done
export PYTHONPATH=/tmp/site:/root/tree
cd /root/tree && for s in 10 33; do LORAD_TREE=/root/tree python3 /root/ref/strong_stock.py stock_liger --json /root/res/ref_liger_\$s.json \
  --steps \$s --warmup 3 > /root/res/ref_\$s.log 2>&1; done; echo done > /root/res/ref.done
export PYTHONPATH=/tmp/site:/root/treeh
cd /root/treeh && LORAD_BENCH_COMMIT=\$(cat COMMIT) python3 -m bench.profile_train --out /root/res/profile_fused.json \
  --lora-kernel fused > /root/res/profile_fused.log 2>&1; echo "exit \$?" > /root/res/profile.done
LORAD_BENCH_COMMIT=\$(cat COMMIT) python3 -m bench.profile_train --out /root/res/profile_nodrop.json --lora-dropout 0 > /root/res/profile_nodrop.log 2>&1
echo "exit \$?" > /root/res/nodrop.done
CHAIN
setsid bash /root/chain.sh > /root/res/chain.log 2>&1 < /dev/null &
sleep 15; ls /root/res; tail -2 /root/res/rounds.log
