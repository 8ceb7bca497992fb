"""No reward raises or hangs on any model output: property tests on arbitrary text, junk and huge inputs."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowmem_r1 import rewards

NAMES = sorted(rewards.REGISTRY)
FUNCS = {name: rewards.build(name) for name in NAMES}
TAGS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<reasoning>",
    "</reasoning>",
    "\\boxed{",
    "}",
    "{",
    "\n",
    " ",
    "Step 1:",
    "1.",
    "First,",
    "$",
    "\\frac{1}{2}",
    "1,000",
    "(",
    ")",
    "*",
    "/",
    "-",
    "苹果",
    "42",
]

# Text built from the pieces rewards look for, so the properties exercise the parsers, not just the misses.
tagged_text = st.lists(st.one_of(st.sampled_from(TAGS), st.text(max_size=8)), max_size=40).map("".join)
any_text = st.one_of(
    st.text(max_size=300), tagged_text, st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
)
completion = st.one_of(
    any_text,
    any_text.map(lambda t: [{"role": "assistant", "content": t}]),
    st.none(),
    st.binary(max_size=50),
    st.integers(),
    st.just([]),
    st.just([{"role": "assistant"}]),
)
column_value = st.one_of(
    st.none(),
    any_text,
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.lists(st.integers(-1000, 1000), max_size=6),
    st.text(max_size=20),
)
prompt = st.one_of(
    st.none(),
    any_text,
    any_text.map(lambda t: [{"role": "user", "content": t}]),
    any_text.map(lambda t: [{"role": "user", "content": "q"}, {"role": "assistant", "content": t}]),
)

COLUMNS = ("answer", "solution", "nums", "target")


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """One-time imports (math-verify, sympy, rapidfuzz) are not what the time bounds below are about."""
    for f in FUNCS.values():
        f(completions=["\\boxed{1}"], answer=["1"], solution=["$1$"], nums=[[1]], target=[1])


def _check(out, n):
    assert isinstance(out, list) and len(out) == n
    for v in out:
        assert v is None or (isinstance(v, float) and math.isfinite(v))


def _call(name, prompts, completions, cols, ids=None):
    t = time.perf_counter()
    out = FUNCS[name](
        prompts=prompts, completions=completions, completion_ids=ids, trainer_state=None, **cols
    )
    elapsed = time.perf_counter() - t
    _check(out, len(completions))
    return out, elapsed


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_input_scores_without_raising(name, data):
    n = data.draw(st.integers(1, 4))
    completions = data.draw(st.lists(completion, min_size=n, max_size=n))
    prompts = data.draw(st.one_of(st.none(), st.lists(prompt, min_size=n, max_size=n)))
    cols = {c: data.draw(st.lists(column_value, min_size=n, max_size=n)) for c in COLUMNS}
    ids = data.draw(
        st.one_of(st.none(), st.lists(st.lists(st.integers(0, 9), max_size=5), min_size=n, max_size=n))
    )
    _, elapsed = _call(name, prompts, completions, cols, ids)
    assert elapsed < 2.0


ADVERSARIAL = [
    "",
    "\x00\xff\ufffd" * 1000,
    "x" * 1_000_000,
    "<think>" * 100_000,
    "</think><answer>" * 50_000,
    "\\boxed{" * 100_000,
    "{" * 500_000 + "}" * 500_000,
    "1," * 300_000,
    "(" * 10_000 + "1" + ")" * 10_000,
    "<answer>" + "9**9**9" + "</answer>",
    "<answer>" + "(" * 100_000 + "</answer>",
    "\\boxed{" + "9^{" * 2000 + "9" + "}" * 2000 + "}",
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{\\frac{" + "1" * 5000 + "}{3}}",
    "Step 1:\n" * 100_000,
    "word " * 200_000,
    "苹果" * 200_000,
    "<reasoning>\n" + "a\n" * 200_000 + "</reasoning>\n<answer>\n1\n</answer>\n" + "z" * 100_000,
]


@pytest.mark.parametrize("name", NAMES)
def test_adversarial_batch_is_bounded(name):
    cols = {
        "answer": ["1"] * len(ADVERSARIAL),
        "solution": ["$\\frac{1}{2}$"] * len(ADVERSARIAL),
        "nums": [[1, 2, 3]] * len(ADVERSARIAL),
        "target": [6] * len(ADVERSARIAL),
    }
    convs = [[{"role": "assistant", "content": t}] for t in ADVERSARIAL]
    prompts = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>"}]] * len(
        ADVERSARIAL
    )
    _, elapsed = _call(name, prompts, convs, cols)
    assert elapsed < 10.0, f"{name} took {elapsed:.1f}s on the adversarial batch"


@pytest.mark.parametrize("name", NAMES)
def test_missing_columns_and_odd_batches(name):
    f = FUNCS[name]
    _check(f(completions=["a", "b"]), 2)  # columns absent: None (not applicable) or a score
    _check(f(prompts=None, completions=[]), 0)
    assert f(completions=None) == []
    _check(f(prompts=["p"], completions=["a", "b"], answer=["1"], solution=["1"]), 2)  # misaligned prompts
