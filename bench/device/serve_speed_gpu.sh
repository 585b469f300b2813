#!/usr/bin/env bash
# Issue 27's serving numbers on the device tool, all parts at one clean commit in one lease of one GPU: the engine
# part (~8 min, the stock arms' compile warm-ups dominate), the HTTP part (~2 min) and the 7B part (~1 min) merged
# into one serve_speed.json, then the GPU test tier, a 7B variant (its own JSON) and the 135M step. A call lasts at
# most 10 minutes, so the job runs in the background and collect.sh brings the results back.
#
# Here, with a clean tree (git status --porcelain empty; .whl/ and .eng/ are git-ignored via .git/info/exclude):
#   git rev-parse HEAD > .eng/COMMIT
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform any -d .whl apscheduler tzlocal watchdog pytest-timeout fastapi starlette pydantic \
#     pydantic_core annotated-types typing-inspection uvicorn uvloop httptools openai jiter sniffio distro anyio \
#     h11 httpx httpcore pyyaml opentelemetry-api importlib-metadata zipp annotated-doc    # ~20 MB
#   (fastapi >= 0.16x imports opentelemetry; without it the HTTP part fails at its first import)
# Call 1 (kind nvidia-h100-x1, carry .whl .eng):  bash bench/device/serve_speed_gpu.sh
# Calls 2, 3 (no carry), back to back:            bash /root/tree/bench/device/collect.sh 1 560
# Then here: res.tgz holds serve_speed.json (engine + http + 7b), gpu_tier.log (the GPU test tier, run after the
# measurements so it cannot disturb them), 7b_rows_od.json, step.json and serve.log.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 4
COMMIT=$(cat .eng/COMMIT) || exit 5
# Jobs run from a copy: the next call re-syncs the working copy and drops the ignored paths it does not carry.
rm -rf /root/tree && mkdir -p /root/tree && cp -r . /root/tree && cd /root/tree || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LORAD_BENCH_COMMIT=$COMMIT
rm -rf /root/res && mkdir -p /root/res && echo "$COMMIT" > /root/res/commit.txt
nvidia-smi --query-gpu=index,name,memory.total --format=csv > /root/res/gpus.txt; lscpu > /root/res/lscpu.txt

bg() {   # bg NAME COMMAND: every stream to /root/res/NAME.log, NAME.done when it ends
  local name=$1; shift
  setsid bash -c "$*; echo \"exit \$?\" > /root/res/$name.done" > /root/res/$name.log 2>&1 < /dev/null &
}
S="python3 bench/serve_speed.py"
bg serve "$S --part engine --part http --part 7b --out /root/res/serve_speed.json; \
  python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -rA -q > /root/res/gpu_tier.log 2>&1; \
  $S --part 7b --rows-leaves o_proj,down_proj --out /root/res/7b_rows_od.json; \
  $S --part step --out /root/res/step.json"
sleep 5; cat /root/res/serve.log; echo "started at commit $COMMIT"
