"""lowmem-r1: R1-Zero style GRPO for small open models on one consumer GPU (or a CPU)."""

__version__ = "0.1.0"
