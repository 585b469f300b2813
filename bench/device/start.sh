# Source in the first real call, from the repository root of the carried copy: copy the clean export to
# /root/tree and work there, set the machine up (setup.sh) and resolve the default model once into
# .cache/lorad-test. The copy must leave the carried folder: the next call re-syncs the working copy and
# removes the ignored paths it does not carry, under the feet of the jobs still running from them.
#   R=$(pwd); . .devw/gb/tree/bench/device/start.sh $R/.devw
DEVW=${1:?usage: . start.sh ABSOLUTE_DEVW_DIR}
rm -rf /root/tree && cp -r "$DEVW/gb/tree" /root/tree && cd /root/tree || return 1
. bench/device/setup.sh "$DEVW" || return 1
export LORAD_BENCH_COMMIT=$(cat COMMIT) TOKENIZERS_PARALLELISM=false
echo "tree commit $LORAD_BENCH_COMMIT"
mkdir -p /root/res && cp COMMIT /root/res/commit.txt
python3 -c "from pathlib import Path; from pipelines.models import EMBEDDED_DEFAULT, resolve_base_model; resolve_base_model(EMBEDDED_DEFAULT, Path('.cache/lorad-test'))" || return 2
nvidia-smi --query-gpu=index,name,memory.total --format=csv > /root/res/gpus.txt; lscpu > /root/res/lscpu.txt
# bg NAME COMMAND...: run a long job in its own session, all of its output to /root/res/NAME.log and a
# NAME.done marker when it ends. Every stream is redirected: a background job that keeps the call's
# stdout open makes the call wait for it until the call's time limit kills everything.
bg() {
  local name=$1; shift
  setsid bash -c "$*; echo \"exit \$?\" > /root/res/$name.done" > /root/res/$name.log 2>&1 < /dev/null &
}
