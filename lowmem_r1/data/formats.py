"""Prompt formats: system prompt presets, the user template, and how a correct answer is written.

A format is a contract between the prompt and the rewards: `r1` asks for <think>/<answer> (think_format,
countdown_equation, answer_match extract=tag), `xml` for <reasoning>/<answer> (xml_* rewards), `boxed`
for a final \\boxed{} (boxed_match, math_accuracy), `plain` for nothing in particular (answer_match
extract=last_number). `gold_completion` writes a row's known answer in that format so the rewards can be
checked against it before any training.
"""

from __future__ import annotations

import re

from lowmem_r1.core.errors import UserError
from lowmem_r1.data.tasks import get_task

SYSTEM_PRESETS: dict[str, str] = {
    # DeepSeek-R1 paper, Table 1 (the R1-Zero training template), as a system prompt.
    "r1": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and "
        "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
        "<answer> answer here </answer>."
    ),
    # The GSM8K GRPO recipe (willccbb's gist, Unsloth's Qwen2.5 GRPO notebook).
    "xml": "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>",
    # DeepSeek-R1-Distill / Qwen2.5-Math usage recommendation for math problems.
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
    "none": "",
}
FORMATS = ("r1", "xml", "boxed", "think_boxed", "plain")


def system_text(system: str) -> str:
    """The system message of a preset name, or the custom text itself ("" means no system message)."""
    return SYSTEM_PRESETS.get(system, system)


def answer_format(prompt) -> str:
    """The answer format a recipe's prompt asks for: prompt.answer_format, else the system preset, else
    guessed from the words of a custom prompt (tags it mentions, \\boxed)."""
    if prompt.answer_format != "auto":
        return prompt.answer_format
    if prompt.system in SYSTEM_PRESETS and prompt.system != "none":
        return prompt.system
    text = " ".join([system_text(prompt.system), prompt.user or "", prompt.assistant_prefix])
    if "<reasoning>" in text:
        return "xml"
    if "<answer>" in text or "<think>" in text:
        return "r1"
    if "\\boxed" in text:
        return "boxed"
    return "plain"


# --------------------------------------------------------------------------------------------------
# The user template

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def template_fields(template: str) -> list[str]:
    return [m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(1)]


def check_template(template: str, available: list[str], key: str = "prompt.user") -> None:
    unknown = [f for f in template_fields(template) if f not in available]
    if unknown:
        raise UserError(
            f"{key}: placeholder {{{unknown[0]}}} is not a column of this task; available: "
            f"{', '.join('{' + a + '}' for a in available)} (write {{{{ and }}}} for literal braces)"
        )


def fill_template(template: str, fields: dict) -> str:
    """Replace {name} with the row's value; `{{`/`}}` are literal braces, and any other brace (e.g. the
    `\\boxed{}` of an instruction) is left alone, so templates need no escaping."""

    def sub(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group()[0]
        value = fields[m.group(1)]
        return value if isinstance(value, str) else str(value)

    return _PLACEHOLDER.sub(sub, template)


def build_messages(user_text: str, prompt) -> list[dict]:
    """The conversation the model sees: optional system message, the user turn, and the assistant prefix
    (continued by the model, not closed) when there is one."""
    messages = []
    system = system_text(prompt.system)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user_text})
    if prompt.assistant_prefix:
        messages.append({"role": "assistant", "content": prompt.assistant_prefix})
    return messages


# --------------------------------------------------------------------------------------------------
# Gold answers


def write_answer(fmt: str, reasoning: str, answer: str) -> str:
    """A completion in format `fmt` with this reasoning and final answer."""
    reasoning = reasoning.strip() or "Let me work it out."
    if fmt == "r1":
        return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"
    if fmt == "xml":
        return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"
    if fmt == "boxed":
        return f"{reasoning}\n\nThe final answer is $\\boxed{{{answer}}}$."
    if fmt == "think_boxed":  # R1-distilled models: the thinking, then a clean written solution, boxed
        return f"<think>\n{reasoning}\n</think>\n\n{reasoning}\n\nThe final answer is $\\boxed{{{answer}}}$."
    if fmt == "plain":
        return f"{reasoning}\nThe answer is {answer}."
    raise ValueError(f"unknown answer format {fmt!r}")


def after_prefix(text: str, prefix: str) -> str:
    """What the model writes after an assistant prefix: the text minus the part the prefix already wrote
    (the longest tag-led end of the prefix that starts the text, e.g. an opened <think>)."""
    stripped = prefix.rstrip()
    for k in range(len(stripped), 0, -1):
        if stripped[-k] == "<" and text.startswith(stripped[-k:]):
            return text[k:]
    return text


def gold_completion(row: dict, recipe) -> str:
    """The row's known answer written as a perfect completion for this recipe (format and prefix)."""
    reasoning, answer = get_task(recipe.data).gold(row)
    text = write_answer(answer_format(recipe.prompt), reasoning, answer)
    return after_prefix(text, recipe.prompt.assistant_prefix) if recipe.prompt.assistant_prefix else text
