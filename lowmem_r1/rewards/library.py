"""The builtin rewards: importing this module registers every one of them (one concept per module)."""

from lowmem_r1.rewards import answer, countdown, format, length, math_equivalence, style  # noqa: F401
