"""Options several commands share, spelled once."""

from __future__ import annotations

import typer

SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: section.key=value (repeatable).")
EngineOpt = typer.Option("auto", "--engine", help="auto | hf | unsloth | vllm (auto: vLLM/Unsloth on a GPU).")
