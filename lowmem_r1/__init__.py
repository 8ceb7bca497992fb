"""lowmem-r1: R1-Zero style GRPO for small open models on one consumer GPU (or a CPU)."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns at every import, on CPUs with AVX512-BF16, that it could not
# fetch an optional kernel from the Hugging Face hub, then uses its own CPU code: noise in every
# command's output, with nothing for the user to do offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
