"""The reward registry: name -> what the reward does, its parameters and the dataset columns it reads."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lowmem_r1.core.errors import UserError

RewardFunc = Callable[..., list]


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class RewardSpec:
    name: str
    description: str
    factory: Callable[..., RewardFunc]
    params: dict[str, Any] = field(default_factory=dict)
    """Parameter name -> default (REQUIRED when the recipe must give it)."""
    columns: tuple[str, ...] = ()
    """Dataset columns the reward reads from its keyword arguments."""
    best: Any = None
    """The full-marks score (a number, or the name of the parameter holding it); None for shaping rewards
    that have no full marks (lengths, penalties). `lowmem-r1 rewards check` judges gold answers by it."""

    def full_marks(self, params: dict[str, Any] | None = None) -> float | None:
        if isinstance(self.best, str):
            merged = {**self.params, **(params or {})}
            value = merged.get(self.best)
            return float(value) if isinstance(value, (int, float)) else None
        return self.best


REGISTRY: dict[str, RewardSpec] = {}


def register(name: str, description: str, columns: tuple[str, ...] = (), best: Any = None):
    """Decorator for a factory `(**params) -> reward function`; the function is named after the reward
    so TRL logs it as rewards/<name>/mean. The reward's parameters and defaults are the factory's own
    (a parameter without a default is REQUIRED)."""

    def deco(factory: Callable[..., RewardFunc]) -> Callable[..., RewardFunc]:
        params = {
            p.name: REQUIRED if p.default is inspect.Parameter.empty else p.default
            for p in inspect.signature(factory).parameters.values()
        }
        REGISTRY[name] = RewardSpec(name, description, factory, params, tuple(columns), best)
        return factory

    return deco


def check(name: str, params: dict[str, Any]) -> RewardSpec:
    """Validate a reward reference and its parameters without building it; returns its spec."""
    if ":" in name:
        func = load_user_reward(name)
        return RewardSpec(name, func.__doc__ or "user reward", lambda **_: func, {}, ())
    spec = REGISTRY.get(name)
    if spec is None:
        import difflib

        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see `lowmem-r1 rewards list`"
        raise UserError(f"unknown reward '{name}'; {hint} (or use module:function / file.py:function)")
    unknown = [p for p in params if p not in spec.params]
    if unknown:
        raise UserError(
            f"reward '{name}' has no parameter {unknown[0]!r}; its parameters: "
            f"{', '.join(spec.params) or 'none'}"
        )
    missing = [p for p, d in spec.params.items() if d is REQUIRED and p not in params]
    if missing:
        raise UserError(
            f"reward '{name}' needs parameter {missing[0]!r}; add {missing[0]} = ... to its table"
        )
    for key, value in params.items():
        _check_type(name, key, value, spec.params[key])
    try:  # factories are cheap and validate their values (unknown modes, ranges): try one now
        spec.factory(**{**{k: v for k, v in spec.params.items() if v is not REQUIRED}, **params})
    except (TypeError, ValueError) as e:
        raise UserError(f"reward '{name}': bad parameters ({e})") from None
    return spec


def _check_type(name: str, key: str, value: Any, default: Any) -> None:
    """A parameter given in a recipe has its default's type (an int where a float goes is fine)."""
    if default is REQUIRED or default is None or value is None:
        return
    want = type(default)
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise UserError(f"reward '{name}': {key} = {value!r} is {type(value).__name__}, expected {want.__name__} "
                        f"(default {default!r}); fix its value in the [[rewards]] table")


def build(name: str, **params: Any) -> RewardFunc:
    """A TRL-style reward function for a registry name or a user's `module:function` / `file.py:function`."""
    spec = check(name, params)
    if ":" in name:
        return spec.factory()
    kwargs = {k: v for k, v in spec.params.items() if v is not REQUIRED}
    kwargs.update(params)
    try:
        func = spec.factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"reward '{name}': bad parameters ({e})") from None
    func.__name__ = name
    return func


_USER_REWARDS: dict[str, RewardFunc] = {}


def load_user_reward(ref: str) -> RewardFunc:
    """Load `package.module:function` or `path/to/file.py:function`, once per process: validation,
    `build` and the trainer all ask for it, and a user's file may do work when imported."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise UserError(f"reward {ref!r}: expected module:function or path/to/file.py:function")
    key = f"{Path(target).resolve()}:{attr}" if target.endswith(".py") else ref
    if key not in _USER_REWARDS:
        _USER_REWARDS[key] = _import_user_reward(ref, target, attr)
    return _USER_REWARDS[key]


def _import_user_reward(ref: str, target: str, attr: str) -> RewardFunc:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(
                f"reward {ref!r}: file {path} not found; check the path (relative to where you run)"
            )
        mod_name = f"lowmem_r1_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(f"reward {ref!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise UserError(
                f"reward {ref!r}: cannot import module {target!r} ({type(e).__name__}: {e})"
            ) from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise UserError(f"reward {ref!r}: {target} has no function {attr!r}")
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return func
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if not takes_kwargs:
        raise UserError(
            f"reward {ref!r}: TRL passes dataset columns as keyword arguments; give it a **kwargs parameter "
            f"(def {attr}(prompts, completions, **kwargs))"
        )
    return func
