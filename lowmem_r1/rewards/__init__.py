"""Rule-based rewards that follow TRL's calling convention exactly.

    f(prompts=None, completions=..., completion_ids=None, **columns) -> list[float | None]

`build(name, **params)` returns such a callable for a registry name, a `module:function` or a
`path/to/file.py:function`; `REGISTRY` describes every builtin reward (parameters, dataset columns).
Importing this package is cheap: math-verify and friends load inside the rewards that need them.
"""

from lowmem_r1.rewards import library as _library  # noqa: F401  (registers the builtin rewards)
from lowmem_r1.rewards.registry import REGISTRY, REQUIRED, RewardFunc, RewardSpec, build, check, register  # noqa: F401
