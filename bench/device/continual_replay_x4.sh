# #11's next measurement on a 4-GPU lease: the lorad arm with a larger replay share, two seeds, one run per GPU
# (~10 min). The baselines need no re-run: bench/continual.py --merge accepts a baselines part made with other
# daemon-only settings, so the committed parts (bench/results/continual_gpu_parts/) complete each result:
#   python3 bench/continual.py --merge res/continual_replay035.json bench/results/continual_gpu_parts/retrain.json \
#       bench/results/continual_gpu_parts/naive.json --out bench/results/continual_gpu_replay035.json
#   (seed 4321: bench/results/continual_gpu_parts/rest_seed4321.json)
# Call: R=$(pwd); . .devw/gb/tree/bench/device/start.sh $R/.devw && . bench/device/continual_replay_x4.sh
C="python3 bench/continual.py --profile gpu --cache .cache/lorad-test --timeout 1500 --arms base,lorad"
export TORCH_COMPILE_DISABLE=1
bg r035 "CUDA_VISIBLE_DEVICES=0 taskset -c 0-15 $C --set data.replay_fraction=0.35 --out /root/res/continual_replay035.json"
bg r040 "CUDA_VISIBLE_DEVICES=1 taskset -c 16-31 $C --set data.replay_fraction=0.4 --out /root/res/continual_replay040.json"
bg r035s "CUDA_VISIBLE_DEVICES=2 taskset -c 32-47 $C --set data.replay_fraction=0.35 --set train.seed=4321 \
  --out /root/res/continual_replay035_seed4321.json"
bg r040s "CUDA_VISIBLE_DEVICES=3 taskset -c 48-63 $C --set data.replay_fraction=0.4 --set train.seed=4321 \
  --out /root/res/continual_replay040_seed4321.json"
sleep 3; ls /root/res
