"""The builtin rewards: importing this module registers every one of them (one concept per module)."""

from . import answer, countdown, format, length, math_equivalence, style  # noqa: F401
