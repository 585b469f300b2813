# The continual benchmark on a 4-GPU lease, every piece in the background (collect with collect.sh):
#   GPU 0  the lorad and base arms; the e2e latency on the GPU; a second-seed control of the ablation
#   GPU 1  the retrain and naive arms (one process each; merge with bench/continual.py --merge)
#   GPU 2-3  the options ablation (6 runs, 3 per GPU)
# Call: R=$(pwd); . .devw/gb/tree/bench/device/start.sh $R/.devw && . bench/device/continual_x4.sh
C="python3 bench/continual.py --profile gpu --cache .cache/lorad-test --timeout 1500"
export TORCH_COMPILE_DISABLE=1   # each month's jobs are fresh processes: compiling costs more than it saves
bg lorad  "CUDA_VISIBLE_DEVICES=0 taskset -c 0-9   $C --arms base,lorad --out /root/res/continual_lorad.json"
bg retrain "CUDA_VISIBLE_DEVICES=1 taskset -c 16-27 $C --arms retrain --out /root/res/continual_retrain.json"
bg naive  "CUDA_VISIBLE_DEVICES=1 taskset -c 28-33 $C --arms naive --out /root/res/continual_naive.json"
bg ablation "taskset -c 34-63 python3 bench/continual_ablation.py --profile gpu --gpus 2,3 --parallel 6 \
  --cache .cache/lorad-test --out /root/res/continual_ablation.json --run-timeout 1700"
bg control2 "CUDA_VISIBLE_DEVICES=0 taskset -c 10-13 python3 bench/continual_ablation.py --profile gpu --gpus 0 \
  --parallel 1 --only control --set train.seed=4321 --cache .cache/lorad-test \
  --out /root/res/continual_ablation_seed4321.json --run-timeout 1700"
bg e2e_gpu "env -u TORCH_COMPILE_DISABLE CUDA_VISIBLE_DEVICES=0 taskset -c 14,15 python3 bench/e2e_latency.py \
  --device cuda --out /root/res/e2e_latency_gpu.json"
sleep 3; ls /root/res
