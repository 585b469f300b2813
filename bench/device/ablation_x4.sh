# The options ablation again (bench/continual_ablation.py), on a 4-GPU lease, ~12 min: its six runs two per GPU on
# GPUs 0-2 and the control's second seed on GPU 3. Re-run because the first one (commit c72d78a) was confounded
# by the category cap (3 x the SMALLEST category: the ~50 raw text records a month held each task at ~140 of ~440);
# now the cap is relative to the median category, and replay counts text (data.replay_unit chars, 0.35).
# Call: R=$(pwd); . .devw/gb/tree/bench/device/start.sh $R/.devw && . bench/device/ablation_x4.sh
export TORCH_COMPILE_DISABLE=1
A="python3 bench/continual_ablation.py --profile gpu --cache .cache/lorad-test --run-timeout 1500"
bg ablation "taskset -c 0-47 $A --gpus 0,1,2 --parallel 6 --out /root/res/continual_ablation.json"
bg control2 "taskset -c 48-63 $A --gpus 3 --parallel 1 --only control --set train.seed=4321 \
  --out /root/res/continual_ablation_seed4321.json"
sleep 3; ls /root/res
