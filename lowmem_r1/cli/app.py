"""The `lowmem-r1` command line: the Typer app, its root callback (--debug), `main()` (a UserError is one
line, exit 2, no traceback unless --debug), and the commands registered in the order `--help` lists them.

Each command lives in the module named after what it holds (train, generate, preflight, export, report,
data, rewards) and only parses its options, calls one library function, and prints. Heavy libraries
(torch, trl, unsloth, vllm) are imported inside the library functions, so `--help` and recipe validation
are instant.
"""

from __future__ import annotations

import sys

import typer

from lowmem_r1.cli import data, export, generate, preflight, report, rewards, train
from lowmem_r1.core import allocator, distributed
from lowmem_r1.core.errors import UserError, printable

app = typer.Typer(
    name="lowmem-r1",
    help="Teach a small open model to reason with GRPO (DeepSeek-R1-Zero style) on one GPU, or on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(train.train)
app.command()(train.serve)
app.command()(preflight.plan)
app.command()(preflight.doctor)
app.command()(export.merge)
app.command()(generate.chat)
app.command("eval")(generate.eval_)
app.command()(generate.sample)
app.command()(report.report)
app.add_typer(data.app, name="data")
app.add_typer(rewards.app, name="rewards")

_DEBUG = False


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    global _DEBUG
    _DEBUG = debug


THIRD_PARTY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub", "unsloth",
               "vllm", "bitsandbytes", "fsspec", "filelock")


def quiet_third_party() -> None:
    """The toolkit's output is its own: libraries' warnings and log lines are off (--debug turns them
    back on), and their progress bars too when the output is not a terminal (a pipe, a log file)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # it logs a bad file at ERROR; we say it in one line
    if not sys.stderr.isatty():
        for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.setdefault(name, "1")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.CRITICAL if name == "datasets" else logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")


def main() -> None:
    if "--debug" not in sys.argv[1:]:
        quiet_third_party()
    try:
        allocator.reexec(sys.argv[1:])
        code = app(standalone_mode=False)  # click returns a typer.Exit's code here instead of raising it
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        if _DEBUG:
            raise
        print(f"error{_rank()}: {printable(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # the environment, not a bug: a file in the way, a read-only or full disk
        if _DEBUG:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {printable(where)}{printable(e.strerror or e)}; check the path and its permissions, or choose another one",
              file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # a usage error from typer's click layer
            e.show()
            sys.exit(2)
        if _DEBUG:
            raise
        print(f"error{_rank()}: {type(e).__name__}: {printable(e)} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def _rank() -> str:
    """Which process said it, when there are several (torchrun, accelerate launch)."""
    w = distributed.world()
    return f" (rank {w.rank})" if w.size > 1 else ""


if __name__ == "__main__":
    main()
