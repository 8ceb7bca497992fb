"""`lowmem-r1 chat`: talk to a trained model, its reasoning shown dimmed and apart from the answer.

Tokens are streamed as they are generated. A run directory is chatted with in the format it was trained
on (its recipe's system prompt and assistant prefix), so what you see is what the rewards saw.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.core.errors import printable
from lowmem_r1.data.formats import system_text
from lowmem_r1.data.splits import continue_assistant
from lowmem_r1.generation.engine import Decoding, Generator, ModelRef, load_generator, resolve_ref

REASONING_OPEN = ("<think>", "<reasoning>")
REASONING_CLOSE = ("</think>", "</reasoning>")
ANSWER_TAGS = ("<answer>", "</answer>")
_TAGS = REASONING_OPEN + REASONING_CLOSE + ANSWER_TAGS

HELP = "/reset  clear the conversation   /system TEXT  set the system prompt   /think [on|off]  show reasoning   /exit"


class ReasoningSplitter:
    """Routes streamed text into (is_reasoning, text) pieces; the tags themselves are dropped. A tag may
    arrive split over several pieces, so a tail that could begin a tag is held back until it resolves."""

    def __init__(self, in_reasoning: bool = False):
        self.in_reasoning = in_reasoning
        self.buf = ""

    def feed(self, text: str) -> list[tuple[bool, str]]:
        self.buf += text
        out: list[tuple[bool, str]] = []
        while True:
            hits = [(self.buf.find(t), t) for t in _TAGS]
            hits = [(i, t) for i, t in hits if i >= 0]
            if not hits:
                break
            i, tag = min(hits)
            if i:
                out.append((self.in_reasoning, self.buf[:i]))
            if tag in REASONING_OPEN:
                self.in_reasoning = True
            elif tag in REASONING_CLOSE:
                self.in_reasoning = False
            self.buf = self.buf[i + len(tag):]
        hold = _partial_tag_len(self.buf)
        ready, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        if ready:
            out.append((self.in_reasoning, ready))
        return out

    def flush(self) -> list[tuple[bool, str]]:
        rest, self.buf = self.buf, ""
        return [(self.in_reasoning, rest)] if rest else []


def _partial_tag_len(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a tag."""
    start = text.rfind("<")
    if start < 0:
        return 0
    tail = text[start:]
    return len(tail) if any(t.startswith(tail) and t != tail for t in _TAGS) else 0


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole completion."""
    s = ReasoningSplitter(in_reasoning)
    parts = s.feed(text) + s.flush()
    return "".join(t for r, t in parts if r).strip(), "".join(t for r, t in parts if not r).strip()


# --------------------------------------------------------------------------------------------------
# A conversation


@dataclass
class Conversation:
    """Multi-turn history rendered with the model's chat template. Earlier turns keep only their answers
    (as DeepSeek-R1 does), so old reasoning does not crowd the context."""

    gen: Generator
    system: str | None = None
    assistant_prefix: str = ""
    history: list[dict] = field(default_factory=list)

    def prompt_ids(self, user: str) -> tuple[list[int], bool]:
        """Token ids for the next turn, and whether the completion starts inside a reasoning block."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": user})
        if not self.assistant_prefix:
            return self.gen.encode(messages), False
        text = continue_assistant(messages, self.assistant_prefix, self.gen.tokenizer)
        return self.gen.encode(text), _opens_reasoning(self.assistant_prefix)

    def reply(self, user: str, sampling: Decoding, on_piece: Callable[[bool, str], None]) -> None:
        """Answer `user`, calling on_piece(is_reasoning, text) as the text streams in, then remember the
        turn (not when interrupted: the next turn starts from the last complete one)."""
        ids, in_reasoning = self.prompt_ids(user)
        splitter = ReasoningSplitter(in_reasoning)
        answer: list[str] = []

        def route(pieces):
            for is_reasoning, text in pieces:
                if not is_reasoning:
                    answer.append(text)
                on_piece(is_reasoning, text)

        self.gen.stream(ids, sampling, lambda piece: route(splitter.feed(piece)))
        route(splitter.flush())
        self.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": "".join(answer).strip()}]

    def reply_text(self, user: str, sampling: Decoding) -> tuple[str, str]:
        parts: list[tuple[bool, str]] = []
        self.reply(user, sampling, lambda is_reasoning, text: parts.append((is_reasoning, text)))
        return ("".join(t for r, t in parts if r).strip(), "".join(t for r, t in parts if not r).strip())

    def reset(self) -> None:
        self.history.clear()


def _opens_reasoning(prefix: str) -> bool:
    last_open = max(prefix.rfind(t) for t in REASONING_OPEN)
    last_close = max(prefix.rfind(t) for t in REASONING_CLOSE)
    return last_open > last_close


def trained_format(ref: ModelRef) -> tuple[str | None, str]:
    """(system prompt, assistant prefix) the run was trained with; (None, "") for other models."""
    if ref.run_dir is None or not (ref.run_dir / "recipe.toml").is_file():
        return None, ""
    recipe = load_recipe(ref.run_dir / "recipe.toml", check_rewards=False)
    return _system_text(recipe), recipe.prompt.assistant_prefix


def _system_text(recipe) -> str | None:
    """The recipe's system prompt as text (a preset name such as `r1` expanded)."""
    return system_text(recipe.prompt.system) or None


# --------------------------------------------------------------------------------------------------
# The command


@dataclass
class ChatOptions:
    sampling: Decoding
    system: str | None = None
    """None: the trained format's system prompt (run directories) or the template's default."""
    think: bool = True
    engine: str = "auto"


def chat(model: str | None, opts: ChatOptions, prompt: str | None = None, compare: str | None = None,
         stdin: IO[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """One-shot (`prompt`) or interactive chat; `compare` names a second model ("base": the run's base)."""
    from rich.console import Console

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    err = Console(file=stderr, highlight=False)
    ref = resolve_ref(model)
    with err.status(f"loading {ref.label} ...", spinner="dots"):
        conv = _conversation(ref, opts)
        other = None
        if compare is not None:
            use_base = compare in ("", "base") and not Path(compare or "base").exists()
            other_ref = ref.base_only() if use_base else resolve_ref(compare)
            other = _conversation(other_ref, opts, like=conv)
    if prompt is not None:
        if other is not None:
            _compare_turn(Console(file=stdout, highlight=False), [other, conv], prompt, opts)
        else:
            _one_shot(conv, prompt, opts, stdout, err)
        return 0
    return repl(conv, opts, stdin or sys.stdin, Console(file=stdout, highlight=False), other)


def _conversation(ref: ModelRef, opts: ChatOptions, like: Conversation | None = None) -> Conversation:
    gen = load_generator(ref, opts.engine, streaming=True)
    system, prefix = trained_format(ref)
    if like is not None:  # the base model of a comparison is asked in the tuned model's format
        system, prefix = like.system, like.assistant_prefix
    return Conversation(gen, opts.system if opts.system is not None else system, prefix)


def _one_shot(conv: Conversation, prompt: str, opts: ChatOptions, stdout: IO[str], err) -> None:
    """The answer alone on stdout (scriptable); reasoning, when shown, goes dimmed to stderr."""
    from rich.text import Text

    wrote, reasoned = "", False

    def show(is_reasoning: bool, text: str) -> None:
        nonlocal wrote, reasoned
        if is_reasoning:
            if opts.think and (reasoned or text.strip()):
                err.print(Text(text if reasoned else text.lstrip(), style="dim"), end="")
                reasoned = True
            return
        if not wrote:
            text = text.lstrip()
            if not text:
                return
            if reasoned:
                err.print()
        wrote += text
        stdout.write(text)
        stdout.flush()

    conv.reply(prompt, opts.sampling, show)
    if not wrote.endswith("\n"):
        stdout.write("\n")
    stdout.flush()


def repl(conv: Conversation, opts: ChatOptions, stdin: IO[str], console, other: Conversation | None = None) -> int:
    """Read a line, answer it, until /exit or end of input. Slash commands change the session."""
    from rich.text import Text

    tty = stdin.isatty() if hasattr(stdin, "isatty") else False
    console.print(Text(f"chatting with {conv.gen.ref.label}  ({HELP})", style="dim"))
    while True:
        line = read_line(stdin, tty, console)
        if line is None:
            break
        line = printable(line.strip())
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                for c in filter(None, (conv, other)):
                    c.reset()
                console.print(Text("(conversation cleared)", style="dim"))
            elif cmd == "/system":
                for c in filter(None, (conv, other)):
                    c.system = arg or None
                    c.reset()
                console.print(Text(f"(system prompt {'set' if arg else 'removed'}; conversation cleared)", style="dim"))
            elif cmd == "/think" and arg in ("on", "off", ""):
                opts.think = arg == "on" if arg else not opts.think
                console.print(Text(f"(reasoning {'shown' if opts.think else 'hidden'})", style="dim"))
            else:
                console.print(Text(f"unknown command {line!r}; {HELP}", style="yellow"))
            continue
        if other is not None:
            _compare_turn(console, [other, conv], line, opts)
            continue
        try:
            _stream_turn(console, conv, line, opts)
        except KeyboardInterrupt:  # stop this answer, keep the session
            console.print(Text("\n(interrupted)", style="dim"))
    return 0


def read_line(stdin: IO[str], tty: bool, console) -> str | None:
    """One line of input, None at its end. At a terminal Python's readline gives line editing and
    history (arrow keys edit the line instead of reaching the model as escape codes), and Ctrl-D ends
    the prompt's line before leaving."""
    if tty and stdin is sys.stdin:
        try:
            import readline  # noqa: F401  (input() uses it once imported)
        except ImportError:  # Windows without pyreadline: plain input()
            pass
        try:
            return input("you> ")
        except EOFError:
            console.print()
            return None
    if tty:
        console.print("you> ", end="")
    line = stdin.readline()
    if not line and tty:
        console.print()
    return line or None


def _stream_turn(console, conv: Conversation, user: str, opts: ChatOptions) -> None:
    from rich.text import Text

    state = None  # what was printed last: reasoning or answer
    hidden = 0

    def show(is_reasoning: bool, text: str) -> None:
        nonlocal state, hidden
        if is_reasoning and not opts.think:
            hidden += len(text)
            return
        if state is None:
            text = text.lstrip()
            if not text:
                return
            console.print(Text("thinking: " if is_reasoning else "", style="dim italic"), end="")
        elif state != is_reasoning:
            text = text.lstrip()
            if not text:
                return
            console.print()  # the answer starts on its own line, apart from the reasoning
            if is_reasoning:
                console.print(Text("thinking: ", style="dim italic"), end="")
        console.print(Text(text, style="dim" if is_reasoning else "bold"), end="")
        state = is_reasoning

    conv.reply(user, opts.sampling, show)
    console.print()
    if hidden:
        console.print(Text(f"(reasoning hidden: {hidden} characters; /think on to show)", style="dim"))


def _compare_turn(console, convs: list[Conversation], user: str, opts: ChatOptions) -> None:
    """The same prompt to each model, answers side by side (left: the base or --compare model)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=False, expand=True)
    cells = []
    for conv in convs:
        table.add_column(conv.gen.ref.label, ratio=1, overflow="fold")
        reasoning, answer = conv.reply_text(user, opts.sampling)
        parts = []
        if reasoning and opts.think:
            parts.append(Text(reasoning, style="dim"))
        parts.append(Text(answer))
        cells.append(Group(*parts))
    table.add_row(*cells)
    console.print(table)
