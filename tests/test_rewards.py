"""The reward library against the seeds' own examples (GSM8K GRPO, R1-Zero countdown, open-r1) and the
issue's definitions."""

from __future__ import annotations

import math
import threading

import pytest

from lowmem_r1 import rewards
from lowmem_r1.core.errors import UserError
from lowmem_r1.rewards.extract import (
    assistant_prefix,
    completion_text,
    extract_answer,
    last_boxed,
    parse_number,
)


def conv(*texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


def score(name, texts, **kwargs):
    params = kwargs.pop("params", {})
    return rewards.build(name, **params)(completions=list(texts), **kwargs)


# --------------------------------------------------------------------------------------------------
# Registry and TRL convention


def test_registry_has_every_issue_reward():
    names = {
        "think_format",
        "xml_strict_format",
        "xml_soft_format",
        "xml_count",
        "integer_answer",
        "answer_match",
        "boxed_match",
        "math_accuracy",
        "countdown_equation",
        "reasoning_steps",
        "cosine_length",
        "repetition_penalty",
        "levenshtein",
        "language_consistency",
        "overlong_penalty",
        "brevity",
        "numeric_closeness",
    }
    assert names <= set(rewards.REGISTRY)
    assert rewards.REGISTRY["answer_match"].columns == ("answer",)
    assert rewards.REGISTRY["countdown_equation"].columns == ("nums", "target")
    assert rewards.REGISTRY["math_accuracy"].columns == ("solution",)


def test_built_function_is_named_and_follows_trl_convention():
    f = rewards.build("answer_match")
    assert f.__name__ == "answer_match"
    out = f(
        prompts=[[{"role": "user", "content": "What is 3 + 5?"}]] * 2,
        completions=conv("8", "9"),
        completion_ids=[[1, 2], [3]],
        answer=["8", "8"],
        trainer_state=object(),
        log_extra=lambda *a: None,
        log_metric=lambda *a: None,
        question=["q", "q"],
    )
    assert out == [1.0, 0.0]
    assert f(completions=["<answer>8</answer>"], answer=["8"]) == [1.0]  # standard format, prompts=None
    assert f(completions=[], answer=[]) == []


def test_bad_names_and_parameters_are_user_errors():
    with pytest.raises(UserError, match="did you mean 'answer_match'"):
        rewards.check("answer_mach", {})
    with pytest.raises(UserError, match="no parameter"):
        rewards.check("answer_match", {"extractt": "tag"})
    with pytest.raises(UserError, match="bad parameters"):
        rewards.build("answer_match", extract="nope")
    with pytest.raises(UserError, match="bad parameters"):
        rewards.build("repetition_penalty", max_penalty=1.5)


def test_user_reward_from_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text(
        "def short(prompts, completions, **kw):\n    return [float(len(c) < 5) for c in completions]\n"
        "def bad(prompts, completions):\n    return []\n"
    )
    func = rewards.build(f"{f}:short")
    assert func(prompts=None, completions=["abc", "abcdefg"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="kwargs"):
        rewards.build(f"{f}:bad")
    import json

    assert rewards.build("json:dumps") is json.dumps  # module:function
    with pytest.raises(UserError, match="no function"):
        rewards.build("json:nope")


def test_user_reward_file_is_imported_once(tmp_path):
    """Validation, rewards score/check and the trainer all load the reward: the user's file runs once."""
    from lowmem_r1.config.recipe import recipe_from_dict
    from lowmem_r1.rewards.recipe_rewards import RecipeRewards

    log = tmp_path / "imports.log"
    f = tmp_path / "counted.py"
    f.write_text(f"open({str(log)!r}, 'a').write('x')\n"
                 "def short(prompts, completions, **kw):\n    return [1.0 for c in completions]\n")
    recipe = recipe_from_dict({"rewards": [{"name": f"{f}:short"}]})
    assert RecipeRewards.from_recipe(recipe).rewards[0].func(prompts=None, completions=["a"]) == [1.0]
    rewards.build(f"{f}:short")
    assert log.read_text() == "x"


def test_full_marks_declared():
    assert rewards.REGISTRY["think_format"].full_marks() == 1.0
    assert rewards.REGISTRY["brevity"].full_marks() is None


# --------------------------------------------------------------------------------------------------
# Extraction


def test_completion_text_forms():
    assert completion_text("a") == "a"
    assert completion_text([{"role": "assistant", "content": "b"}]) == "b"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "c"}]}]) == "c"
    assert completion_text(None) == "" and completion_text(b"\xff") == "\ufffd" and completion_text(3) == ""


@pytest.mark.parametrize(
    "s,value",
    [
        ("1,000", 1000),
        ("$1000", 1000),
        ("1000.00", 1000),
        ("1000.", 1000),
        ("-5", -5),
        ("50%", 50),
        (".5", 0.5),
        ("\\frac{1}{2}", 0.5),
        ("3/4", 0.75),
        ("$\\$1,234.5$", 1234.5),
        ("\\boxed{72}", 72),
        ("#### 72", 72),
        (" 7 ", 7),
    ],
)
def test_parse_number(s, value):
    assert parse_number(s) == value


@pytest.mark.parametrize("s", ["", "abc", "1 2", "1,00", "x=5", "5 apples", "--5", "1/0", None, "1e400"])
def test_parse_number_rejects(s):
    assert parse_number(s) is None


def test_extract_modes():
    text = "We get 12 then 13. <answer>\\boxed{14}</answer> after 15"
    assert extract_answer(text, "tag") == "\\boxed{14}"
    assert extract_answer(text, "auto") == "14"
    assert extract_answer(text, "boxed") == "14"
    assert extract_answer(text, "last_number") == "15"
    assert extract_answer("no answer here", "auto") is None
    assert extract_answer("first 3, then -1,250.5", "last_number") == "-1,250.5"
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{} and \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{a} \\boxed{ }") == "a"  # the last NON-EMPTY one
    assert last_boxed("\\boxed{unclosed") is None


def test_assistant_prefix():
    assert assistant_prefix("<|im_start|>assistant\nLet me solve this step by step.\n<think>") == "<think>"
    assert assistant_prefix("...\n<think>\n") == "<think>\n"
    assert assistant_prefix("Use <think> </think> tags.") == ""
    assert (
        assistant_prefix([{"role": "user", "content": "q"}, {"role": "assistant", "content": "Ok.\n<think>"}])
        == "<think>"
    )
    assert assistant_prefix([{"role": "user", "content": "end with <think>"}]) == ""


# --------------------------------------------------------------------------------------------------
# R1-Zero countdown seed (philschmid mini-deepseek-r1): format and equation rewards


CORRECT_1 = """We need to find an equation using the numbers 19, 36, 55, and 7
exactly once, with basic arithmetic operations, that equals 65. One possible
combination is 55 + 36 - 19 + 7... </think>
<answer> 55 + 36 - 7 - 19 </answer>"""
CORRECT_2 = """ ... </think>
<answer> 55 + 36 - 7 - 19 </answer>"""
WRONG_FORMAT = """User: Using the numbers [19, 36, 55, 7], create an equation that equals 65."""
WRONG_FORMAT_2 = (
    "To find the equation that equals 79 using the numbers 95, 78, 6, 88, I'll start by adding 88 and 95:\n"
    "95 + 88 = 183\n"
    "Now, let's subtract 104 from 183 to get 79:\n"
    "183 - 104 = 79\n"
    "<think> 183 - 104 = 79 </think><think> 183 - 104 = 79 </think><answer> 183 - 104 = 79 </answer>"
)
WRONG_RESULT = """ ... </think>
<answer> 55 + 36 - 7 - 18 </answer>"""
COUNTDOWN = [CORRECT_1, CORRECT_2, WRONG_FORMAT, WRONG_FORMAT_2, WRONG_RESULT]
COUNTDOWN_PROMPT = (
    "<|im_start|>user\nUsing the numbers [19, 36, 55, 7], create an equation that equals 65."
    "<|im_end|>\n<|im_start|>assistant\nLet me solve this step by step.\n<think>"
)


def test_countdown_seed_format():
    out = score("think_format", COUNTDOWN, prompts=[COUNTDOWN_PROMPT] * 5)
    assert out == [1.0, 1.0, 0.0, 0.0, 1.0]
    # Without the assistant prefix the same completions lack their opening tag.
    assert score("think_format", COUNTDOWN) == [0.0] * 5


def test_countdown_seed_equation():
    out = score(
        "countdown_equation",
        COUNTDOWN,
        prompts=[COUNTDOWN_PROMPT] * 5,
        target=["65"] * 5,
        nums=[[19, 36, 55, 7]] * 5,
    )
    assert out == [1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "answer",
    [
        "9**9**9",
        "1/0",
        "(" * 10_000 + "1" + ")" * 10_000,
        "１９ + 36 + 55 - 7",
        "x" * 1_000_000,
        "__import__('os').system('true')",
        "19 + 36 + 55 - 7 = 103",
        "19 36 55 7",
        "19 + 36 + 55 + 7 + 65 - 65",
        "(19 + 36) * (55 - 7) / 0",
        "2.5 + 19",
        "19 + 36 + 55 + 7 -",
        ")19 + 36(",
    ],
)
def test_countdown_adversarial_answers_score_zero_fast(answer):
    import time

    t = time.perf_counter()
    out = score("countdown_equation", [f"<answer>{answer}</answer>"], target=[65], nums=[[19, 36, 55, 7]])
    assert out == [0.0]
    assert time.perf_counter() - t < 0.5


def test_countdown_exact_arithmetic_and_parentheses():
    f = rewards.build("countdown_equation")
    assert f(completions=["<answer>(6 / 4) * 2 + 1</answer>"], nums=[[1, 2, 4, 6]], target=[4]) == [1.0]
    assert f(completions=["<answer>-(1 - 2) * (4 + 6)</answer>"], nums=[[1, 2, 4, 6]], target=["10"]) == [1.0]
    assert f(completions=["<answer>1 + 2 + 4 + 6</answer>"], nums=[[1, 2, 4]], target=[13]) == [0.0]  # extra
    assert f(completions=["<answer>1 + 2</answer>"], nums=[None], target=[3]) == [None]


# --------------------------------------------------------------------------------------------------
# GSM8K GRPO seed (willccbb grpo_demo): xml rewards, int and correctness


GOOD_XML = "<reasoning>\nJanet has 16 eggs, eats 3, bakes 4.\n</reasoning>\n<answer>\n18\n</answer>\n"


def _seed_count_xml(text):
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


XML_CASES = [
    GOOD_XML,
    GOOD_XML + "trailing chatter",
    GOOD_XML.rstrip("\n"),
    "<reasoning>x</reasoning><answer>18</answer>",
    "<reasoning> a </reasoning>\n\n  <answer> 18 </answer>",
    "18",
    "",
    "<answer>\n18\n</answer>\n",
    "<reasoning>\nmulti\nline\n</reasoning>\n<answer>\n18\n</answer>\n",
]


def test_gsm8k_seed_xml_count_matches_seed_formula():
    out = score("xml_count", XML_CASES)
    assert out == pytest.approx([_seed_count_xml(t) for t in XML_CASES])
    assert out[0] == 0.5


def test_gsm8k_seed_strict_and_soft():
    strict = score("xml_strict_format", XML_CASES)
    soft = score("xml_soft_format", XML_CASES)
    assert strict == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert soft == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_gsm8k_seed_correctness_and_int():
    texts = [
        GOOD_XML,
        GOOD_XML.replace("18", "17"),
        "<reasoning>\n.\n</reasoning>\n<answer>\n$18.00\n</answer>\n",
        "<answer>eighteen</answer>",
        "no tags 18",
    ]
    assert score("answer_match", texts, answer=["18"] * 5, params={"extract": "tag"}) == [
        1.0,
        0.0,
        1.0,
        0.0,
        0.0,
    ]
    assert score("integer_answer", texts) == [1.0, 1.0, 0.0, 0.0, 0.0]
    # GSM8K's raw answer column ("... #### 18") works too.
    assert score("answer_match", [GOOD_XML], answer=["16 - 3 - 4 = 9 ... #### 18"]) == [1.0]


@pytest.mark.parametrize("written", ["1,000", "$1000", "1000.00", "1000.", "1000", "\\$1,000"])
def test_answer_match_gsm8k_number_forms(written):
    assert score("answer_match", [f"<answer>{written}</answer>"], answer=["1000"]) == [1.0]


def test_answer_match_modes_and_text():
    assert score("answer_match", ["3 + 5 = 8."], answer=["8"], params={"extract": "last_number"}) == [1.0]
    assert score("answer_match", ["3 + 5 = 8."], answer=["8"], params={"extract": "tag"}) == [0.0]
    assert score("answer_match", ["<answer>The Eiffel Tower.</answer>"], answer=["the eiffel  tower"]) == [
        1.0
    ]
    assert score("answer_match", ["<answer>8</answer>"], answer=[None]) == [None]


def test_numeric_closeness_gives_partial_credit_that_falls_with_the_distance():
    texts = ["13 * 7 = 91", "13 * 7 = 90", "13 * 7 = 98", "13 * 7 = 910", "no number"]
    got = score("numeric_closeness", texts, answer=["91"] * 5, params={"extract": "last_number"})
    assert got[0] == 1.0 and got[-1] == 0.0
    assert 1.0 > got[1] > got[2] > got[3] > 0.0
    assert abs(got[2] - math.exp(-7 / (0.05 * 91 + 1))) < 1e-12
    assert score("numeric_closeness", ["<answer>1,000</answer>"], answer=["1000"]) == [1.0]
    assert score("numeric_closeness", ["90"], answer=["91"], params={"tolerance": 0}) == [math.exp(-1)]
    assert score("numeric_closeness", ["8", "8"], answer=["eight", None]) == [None, None]
    with pytest.raises(UserError, match="bad parameters"):
        rewards.build("numeric_closeness", tolerance=-1)


def test_boxed_match():
    texts = ["so \\boxed{\\frac{1}{2}} no wait \\boxed{0.5}", "\\boxed{\\text{(B)}}", "\\boxed{}", "nothing"]
    assert score("boxed_match", texts, answer=["1/2", "(b)", "1", "1"]) == [1.0, 1.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# open-r1 seed: format, accuracy, reasoning steps, cosine, repetition


def test_open_r1_format():
    good = [
        "<think>Some reasoning</think><answer>The answer</answer>",
        "<think>\nI will count each distinct object in the image:\n1. Purple scooter\n2. Red bicycle\n\n"
        "There are 9 distinct objects in total.\n</think>\n<answer>9</answer>",
    ]
    bad = [
        "<think>Only thinking</think>",
        "<answer>Only answer</answer>",
        "No tags at all",
        "<think>Missing closing</think><answer>Missing closing",
        "<think>Wrong order</answer><answer>Wrong order</think>",
        "<think>a</think><answer>b</answer> trailing",
        "<think><think>a</think></think><answer>b</answer>",
    ]
    assert score("think_format", conv(*good)) == [1.0, 1.0]
    assert score("think_format", conv(*bad)) == [0.0] * len(bad)
    nl = {"newlines": True}
    assert score("think_format", ["<think>\nr\n</think>\n<answer>\n9\n</answer>"], params=nl) == [1.0]
    assert score("think_format", [good[0], good[1]], params=nl) == [0.0, 0.0]


def test_open_r1_accuracy():
    out = score(
        "math_accuracy",
        conv(r"\boxed{\frac{63}{400}}", r"\boxed{\frac{64}{400}}"),
        solution=[r"\frac{63}{400}"] * 2,
    )
    assert out == [1.0, 0.0]
    # Unparseable gold: not applicable (None), not a fake score.
    assert score("math_accuracy", ["\\boxed{1}"], solution=["no math here at all"]) == [None]
    assert score("math_accuracy", ["\\boxed{1}"], solution=[None]) == [None]


@pytest.mark.parametrize(
    "content,expected",
    [
        ("Step 1: First step\nStep 2: Second step\nStep 3: Third step", 1.0),
        ("First, we do this.\nSecond, we do that.\nFinally, we conclude.", 1.0),
        ("Step 1: Only step", 1 / 3),
        ("First, we do this.\nFinally, we conclude.", 2 / 3),
        ("Just plain text without any clear steps", 0.0),
        ("1. a\n2. b\n- c", 1.0),
    ],
)
def test_open_r1_reasoning_steps(content, expected):
    assert score("reasoning_steps", conv(content)) == [pytest.approx(expected)]


@pytest.mark.parametrize(
    "content,solution,length,expected",
    [
        (r"\boxed{\frac{63}{400}}", r"\frac{63}{400}", 20, 0.943),
        (r"\boxed{\frac{63}{400}}", r"\frac{63}{400}", 80, 0.547),
        (r"\boxed{\frac{64}{400}}", r"\frac{63}{400}", 20, -0.942),
        (r"\boxed{\frac{64}{400}}", r"\frac{63}{400}", 80, -0.547),
    ],
)
def test_open_r1_cosine(content, solution, length, expected):
    params = dict(
        min_value_wrong=-1.0, max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0, max_len=100
    )
    padded = content + " " * (length - len(content))
    out = score("cosine_length", conv(padded), solution=[solution], params=params)
    assert out[0] == pytest.approx(expected, abs=5e-3)


@pytest.mark.parametrize(
    "ngram,penalty,text,expected",
    [
        (2, -1.0, "this is a test sentence", 0.0),
        (2, -1.0, "this this this this this", -0.75),
        (2, -1.0, "this is a this is a test", -1 / 3),
        (3, -0.5, "this is a test", 0.0),
        (3, -0.5, "test test test test", -0.25),
        (2, -1.0, "", 0.0),
        (3, -2.0, "this is a this is a test", -0.4),
        (3, -1.0, "word", 0.0),
        (3, -1.0, "two words", 0.0),
        (3, -1.0, "word word word word", -0.5),
        (3, -1.0, "one two one two", 0.0),
        (3, -1.0, "A B C A B C", -0.25),
        (3, -1.0, "A B C A B C E F G A B C A B C", -0.3846),
        (3, -1.0, "A B C D E F G H I J K L", 0.0),
    ],
)
def test_open_r1_repetition(ngram, penalty, text, expected):
    out = score("repetition_penalty", conv(text), params={"ngram_size": ngram, "max_penalty": penalty})
    assert out[0] == pytest.approx(expected, abs=1e-4)
    assert score("repetition_penalty", conv("This is A Test"), params={"ngram_size": 2}) == score(
        "repetition_penalty", conv("this IS a test"), params={"ngram_size": 2}
    )


# --------------------------------------------------------------------------------------------------
# Length, similarity, language


def test_brevity_chars_and_tokens():
    assert score("brevity", ["", "x" * 40, "x" * 200]) == [1.0, 0.5, 0.0]
    out = rewards.build("brevity", max_tokens=10)(completions=["x" * 200], completion_ids=[[1] * 5])
    assert out == [0.5]
    # max_tokens without ids falls back to characters
    assert rewards.build("brevity", max_tokens=10)(completions=["x" * 40]) == [0.5]


def test_overlong_penalty_dapo():
    f = rewards.build("overlong_penalty", max_length=100, cache_length=20)
    ids = [[0] * n for n in (50, 80, 90, 100, 101)]
    assert f(completions=["."] * 5, completion_ids=ids) == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert f(completions=["x" * 90]) == [pytest.approx(-0.5)]  # characters without ids


def test_levenshtein():
    f = rewards.build("levenshtein")
    out = f(
        completions=["<think>hmm</think><answer>x = 2</answer>", "<think>.</think> x = 3", "abc"],
        solution=["x = 2", "x = 2", None],
    )
    assert out[0] == 1.0 and 0.5 < out[1] < 1.0 and out[2] is None


def test_language_consistency():
    f = rewards.build("language_consistency")
    en = [{"role": "user", "content": "How many apples are left?"}]
    zh = [{"role": "user", "content": "还剩下多少个苹果？"}]
    out = f(
        prompts=[en, en, zh, zh],
        completions=conv(
            "<think>We count the apples.</think>",
            "<think>我们 count 苹果</think>",
            "<think>我们数一下苹果</think>",
            "<think>We count the apples</think>",
        ),
    )
    assert out[0] == 1.0 and 0 < out[1] < 1 and out[2] == 1.0 and out[3] == 0.0
    assert rewards.build("language_consistency", language="cjk")(completions=["苹 apple"]) == [0.5]


# --------------------------------------------------------------------------------------------------
# math-verify bounds


def test_math_accuracy_gold_parsed_once():
    from lowmem_r1.rewards import math_equivalence as me

    gold = r"\frac{7}{13}"
    me.parse_gold.cache_clear()
    score("math_accuracy", [r"\boxed{\frac{7}{13}}"] * 8 + ["\\boxed{1}"] * 8, solution=[gold] * 16)
    info = me.parse_gold.cache_info()
    assert info.misses == 1 and info.hits == 15


def test_math_accuracy_deadline_bounds_a_slow_parse(monkeypatch):
    import time

    from lowmem_r1.rewards import math_equivalence as me

    def slow(region):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(me, "_parse_pred", slow)
    t = time.perf_counter()
    out = rewards.build("math_accuracy", timeout=0.2)(
        completions=["\\boxed{x+1}"] * 3, solution=["$x+1$"] * 3
    )
    assert out == [0.0, 0.0, 0.0]
    assert time.perf_counter() - t < 2.0


def test_math_accuracy_outside_main_thread():
    """math-verify's own timeout raises outside the main thread; ours runs the batch in a child process."""
    result = {}

    def run():
        result["out"] = score(
            "math_accuracy", [r"\boxed{\frac{1}{2}}", r"\boxed{3}"], solution=["0.5", "$4$"]
        )

    th = threading.Thread(target=run)
    th.start()
    th.join(120)
    assert result.get("out") == [1.0, 0.0]


def test_cosine_value_range():
    out = score("cosine_length", ["\\boxed{2}" + " " * 5000, "\\boxed{3}"], solution=["2", "2"])
    assert out[0] == pytest.approx(0.5) and out[1] == pytest.approx(
        -1.0 + 0.5 * 0.5 * (1 - math.cos(9 / 1000 * math.pi)), abs=1e-6
    )


@pytest.mark.parametrize(
    "answer,gold",
    [
        ("42", "$42$"),
        ("41", "$42$"),
        ("-3", "$-3$"),
        ("45/58", "$\\frac{45}{58}$"),
        ("5/18", "$\\frac{15}{54}$"),
        ("\\frac{1}{2}", "$0.5$"),
        ("\\dfrac{2}{4}", "$\\frac12$"),
        ("7", "$\\frac{14}{2}$"),
        ("3", "$\\frac{7}{2}$"),
        ("0", "$0$"),
        ("100", "$10^2$"),
        ("12", "$12\\%$"),
    ],
)
def test_exact_number_shortcut_agrees_with_math_verify(answer, gold):
    """The shortcut for bare integers/fractions must give what math-verify itself gives."""
    import math_verify

    from lowmem_r1.rewards import math_equivalence as me

    region, _ = me.answer_region(f"<answer>{answer}</answer>")
    full = math_verify.verify(list(me.parse_gold(gold)), list(me._parse_pred(region)))
    ours = score("math_accuracy", [f"<answer>{answer}</answer>"], solution=[gold])[0]
    assert ours == (1.0 if full else 0.0)


def test_slow_gold_is_not_applicable_for_its_batch_only(monkeypatch):
    import time

    from lowmem_r1.rewards import math_equivalence as me

    real = me.parse_gold
    slow = {"on": True}

    def maybe_slow(gold):
        while slow["on"]:
            time.sleep(0.01)
        return real(gold)

    monkeypatch.setattr(me, "GOLD_TIMEOUT", 0.1)
    monkeypatch.setattr(me, "parse_gold", maybe_slow)
    f = rewards.build("math_accuracy", timeout=0.1)
    t = time.perf_counter()
    assert f(completions=["\\boxed{2}"] * 8, solution=["$2$"] * 8) == [None] * 8
    assert time.perf_counter() - t < 1.0  # one gold timeout per batch, not one per completion
    slow["on"] = False  # the machine is idle again: the next batch parses the gold
    assert f(completions=["\\boxed{2}", "\\boxed{3}"], solution=["$2$"] * 2) == [1.0, 0.0]


def test_boxed_format_r1_distilled_shape():
    """The R1-distill chat template opens <think> in the prompt: the completion only closes it."""
    texts = [
        "Compute 3 + 5 = 8.\n</think>\n\nSo the answer is $\\boxed{8}$.",  # prompt opened <think>
        "<think>\nadd\n</think>\n\\boxed{8}",  # opened in the completion
        "add them \\boxed{8}",  # never closes its reasoning
        "</think>\n\\boxed{}",  # empty box
        "</think> \\boxed{7} or \\boxed{8}",  # two answers
        "</think> \\boxed{8} </think>",  # two closings
        "\\boxed{8} <think> x </think>",  # the answer is inside/before the reasoning
        "<think> a </think> <think> b </think> \\boxed{8}",
    ]
    assert score("boxed_format", texts) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    anywhere = ["\\boxed{8}", "none", "\\boxed{1}, \\boxed{2}", "\\boxed{ }"]
    assert score("boxed_format", anywhere, params={"think": False}) == [1.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# A recipe's rewards, as training, `rewards score/check` and eval call them


def test_recipe_rewards_names_policy_and_total(tmp_path):
    from lowmem_r1.config.recipe import recipe_from_dict
    from lowmem_r1.rewards.recipe_rewards import RecipeRewards, RewardError

    f = tmp_path / "bad.py"
    f.write_text("def explode(prompts, completions, **kw):\n    return [1 / 0 for _ in completions]\n"
                 "def short(prompts, completions, **kw):\n    return [1.0]\n")
    recipe = recipe_from_dict({"rewards": [{"name": "brevity", "weight": 2.0}, {"name": "brevity", "max_chars": 10},
                                           {"name": f"{f}:explode", "on_error": "skip"}]})
    rr = RecipeRewards.from_recipe(recipe)
    assert rr.names == ["brevity", "brevity_2", "explode"] and rr.weights == [2.0, 1.0, 1.0]
    prompt = [{"role": "user", "content": "hi"}]
    completion = rr.wrap("abcde", prompt)
    assert completion == [{"role": "assistant", "content": "abcde"}] and rr.wrap("abcde", "hi") == "abcde"
    values = rr.score_all([prompt], [completion])
    assert values == {"brevity": [1 - 5 / 80], "brevity_2": [0.5], "explode": [None]}
    assert rr.total(v[0] for v in values.values()) == pytest.approx(2 * (1 - 5 / 80) + 0.5)
    explode = rr.rewards[2]
    assert rr.call(explode, [prompt], [completion])[1] is not None  # skipped, and the error handed back
    with pytest.raises(RewardError) as raised:
        rr.call(explode, [prompt], [completion], on_error="raise")
    assert str(raised.value) == "ZeroDivisionError: division by zero"
    message = raised.value.describe()
    assert message.startswith("reward 'explode' raised ZeroDivisionError") and "completion: 'abcde'" in message
    short = RecipeRewards.from_recipe(recipe_from_dict({"rewards": [{"name": f"{f}:short"}]})).rewards[0]
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        rr.call(short, ["a", "b"], ["x", "y"])
