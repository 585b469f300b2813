# Issue 22's continual benchmark, reported on the TEST split, for ONE seed on ONE GPU (nvidia-h200 preferred: 16
# cores, 139 GiB; the kinds lent when no multi-GPU kind is). Three processes share the card: base + lorad (the
# daemon's defaults), retrain, naive; merge them afterwards, here:
#   python3 bench/continual.py --merge res/continual_lorad_seedS.json res/continual_retrain_seedS.json \
#       res/continual_naive_seedS.json --out bench/results/continual_gpu.json      (seed 4321: ..._seed4321.json)
# Before answers were scored, base + lorad took ~10 min and retrain ~6 on an H200 (two per card); scoring answers on
# validation and test and the MCQ set every month is unmeasured on a GPU, so collect twice or thrice.
# This reports the current defaults on test; freezing them on validation is the replay sweep's job
# (continual_split_x8.sh, which needs 3 GPUs a seed).
# Call: R=$(pwd); . .devw/gb/tree/bench/device/start.sh $R/.devw && . bench/device/continual_1gpu.sh 1234
SEED=${1:-1234}
export TORCH_COMPILE_DISABLE=1   # each month's jobs are fresh processes: compiling costs more than it saves
C="python3 bench/continual.py --profile gpu --cache .cache/lorad-test --timeout 1500 --set train.seed=$SEED"
bg lorad_$SEED "OMP_NUM_THREADS=6 taskset -c 0-5 $C --arms base,lorad --out /root/res/continual_lorad_seed$SEED.json"
bg retrain_$SEED "OMP_NUM_THREADS=5 taskset -c 6-10 $C --arms retrain --out /root/res/continual_retrain_seed$SEED.json"
bg naive_$SEED "OMP_NUM_THREADS=5 taskset -c 11-15 $C --arms naive --out /root/res/continual_naive_seed$SEED.json"
sleep 3; ls /root/res
