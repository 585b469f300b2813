"""lorad's data, training, evaluation, drift and export pipelines (each stage runnable as ``python -m``)."""

import logging

# bitsandbytes (imported by peft) warns on every import on an AVX512-BF16 CPU that it could not download an
# optional 4-bit CPU kernel from the Hugging Face hub ("Failed to load CPU gemm_4bit_forward from
# kernels-community"): lorad never runs 4-bit on a CPU and has no hub access, so every job log carried noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
