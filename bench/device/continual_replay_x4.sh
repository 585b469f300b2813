# #11's measurement of the replay share on a 4-GPU lease: eight lorad-arm runs, two per GPU (8 cores each),
# ~12 min. Four settings x two seeds:
#   data.replay_unit=chars (the replay share counted in text, so month 5's long consultation answers get
#   their share of replayed text) at replay_fraction 0.3, 0.35 and 0.38; replay_unit=records at 0.4.
# The baselines need no re-run: bench/continual.py --merge accepts a baselines part made with other
# daemon-only settings, so the committed parts (bench/results/continual_gpu_parts/) complete each result:
#   python3 bench/continual.py --merge res/replay_chars030_seed1234.json bench/results/continual_gpu_parts/retrain.json \
#       bench/results/continual_gpu_parts/naive.json --out bench/results/continual_gpu_replay_chars030_seed1234.json
#   (seed 4321: bench/results/continual_gpu_parts/rest_seed4321.json)
# Call: R=$(pwd); . .devw/gb/tree/bench/device/start.sh $R/.devw && . bench/device/continual_replay_x4.sh
C="python3 bench/continual.py --profile gpu --cache .cache/lorad-test --timeout 1500 --arms base,lorad"
export TORCH_COMPILE_DISABLE=1
i=0
for v in "chars 0.30" "chars 0.35" "chars 0.38" "records 0.40"; do
  set -- $v
  for seed in 1234 4321; do
    gpu=$((i / 2)); lo=$((i * 8)); hi=$((lo + 7)); tag="replay_$1$(echo $2 | tr -d .)_seed$seed"
    bg $tag "CUDA_VISIBLE_DEVICES=$gpu taskset -c $lo-$hi $C --set data.replay_unit=$1 \
      --set data.replay_fraction=$2 --set train.seed=$seed --out /root/res/$tag.json"
    i=$((i + 1))
  done
done
sleep 3; ls /root/res
