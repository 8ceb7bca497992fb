"""The docs stay true to the repository: generated references match the code, links resolve, the README
stays a short guide, nothing points outside the repository, every benchmark script has its row."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
MARKDOWN = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 300


def test_generated_reference_matches_the_code():
    """docs/recipes.md (every recipe key) and docs/rewards.md (every reward) are what make_reference.py writes."""
    done = subprocess.run([sys.executable, str(DOCS / "make_reference.py"), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def make_reference():
    """docs/make_reference.py as a module (docs/ is no package)."""
    spec = importlib.util.spec_from_file_location("make_reference", DOCS / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_key_has_a_description():
    """`make_reference.py --missing` lists nothing: a new recipe key needs its attribute docstring (the string
    literal right after the field), or its row in docs/recipes.md says nothing."""
    missing = make_reference().undocumented()
    assert not missing, f"recipe keys without a description (add a docstring after the field in " \
                        f"lowmem_r1/config/recipe.py): {missing}"


def test_pydantic_carries_the_descriptions():
    """use_attribute_docstrings is on for every section, so `Recipe.model_fields[...].description` holds the
    same text the reference shows."""
    from lowmem_r1.config.recipe import Recipe

    ref = make_reference()
    sections = (ref.section_model(f.annotation)[0] for f in Recipe.model_fields.values())
    models = [Recipe, *(m for m in sections if m is not None)]
    differ = [f"{model.__name__}.{name}" for model in models
              for name, text in ref.attribute_docs(model).items()
              if name in model.model_fields and model.model_fields[name].description != text]
    assert not differ, f"pydantic's description differs from the attribute docstring: {differ}"


def test_readme_is_a_short_guide():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): " \
                                           f"move reference material to docs/"


# --- links ---------------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where [x](y) is no link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose_lines(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    return text.splitlines()


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        try:
            dest.relative_to(REPO)
        except ValueError:
            bad.append(f"{target} (outside the repository)")
            continue
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.relative_to(REPO)})")
    return bad


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert not broken_links(path), f"{path.relative_to(REPO)}: broken links: {broken_links(path)}"


def test_the_link_checker_finds_a_broken_link(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "a.md").write_text("# Title here\n[ok](a.md#title-here) [gone](b.md) [up](../x.md) "
                                   "[anchor](a.md#nope) `[code](c.md)` [web](https://example.com)\n")
    assert broken_links(tmp_path / "a.md") == ["b.md (no such file)", "../x.md (outside the repository)",
                                               "a.md#nope (no heading #nope in a.md)"]


def test_slug_follows_github():
    assert slug("GRPO controls (`[training]`, `[generation]`)") == "grpo-controls-training-generation"
    assert slug("`doctor`'s rows for several processes") == "doctors-rows-for-several-processes"
    assert slug("Adding a stage, a reward, a task, a recipe key") == "adding-a-stage-a-reward-a-task-a-recipe-key"


# --- nothing outside the repository --------------------------------------------------------------------

OUTSIDE = ("FACTS" + ".md", "../" + "shared")  # split so that this file does not match itself
SCANNED = ["README.md", "BENCHMARKS.md", "Makefile", "pyproject.toml", "docs", "recipes", "lowmem_r1", "scripts",
           "tests", ".ci"]


def mentions_outside() -> list[str]:
    found = []
    for name in SCANNED:
        root = REPO / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts or path.resolve() == Path(__file__).resolve():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for n, line in enumerate(text.splitlines(), 1):
                for word in OUTSIDE:
                    if word in line:
                        found.append(f"{path.relative_to(REPO)}:{n}: {word}")
    return found


def test_nothing_points_at_files_outside_the_repository():
    found = mentions_outside()
    assert not found, "files outside the repository are cited (state the fact, or point at BENCHMARKS.md / " \
                      "docs/log.md):\n" + "\n".join(found)


# --- benchmarks ----------------------------------------------------------------------------------------


def benchmark_rows() -> str:
    return "\n".join(line for line in (REPO / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
                     if line.startswith("|"))


def test_every_benchmark_script_has_a_row():
    rows = benchmark_rows()
    missing = [p.name for p in sorted((REPO / "scripts").glob("bench_*.py")) if f"scripts/{p.name}" not in rows]
    assert not missing, f"BENCHMARKS.md has no table row for {missing}: add goal, figure, machine, date, commit"


def test_make_targets_named_in_the_docs_exist():
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), re.MULTILINE))
    named = {t for path in MARKDOWN
             for t in re.findall(r"(?:^\s+|`)make ([a-z][\w-]*)", path.read_text(encoding="utf-8"), re.MULTILINE)}
    assert named <= targets, f"the docs name make targets the Makefile lacks: {sorted(named - targets)}"


def test_readme_lists_every_command():
    import typer

    from lowmem_r1.cli import app

    def paths(command, prefix=""):
        subs = getattr(command, "commands", None)
        if not subs:
            return [prefix.strip()]
        return [p for name, sub in subs.items() for p in paths(sub, f"{prefix}{name} ")]

    rows = [line for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines() if line.startswith("| `")]
    missing = [p for p in paths(typer.main.get_command(app))
               if not any(re.match(rf"\| `{re.escape(p)}[ `]", row) for row in rows)]
    assert not missing, f"README.md's commands table lacks: {missing}"


SOURCE_PATH = re.compile(r"\blowmem_r1/[\w/]+\.(?:py|yaml)\b")


def named_source_files() -> dict[str, list[str]]:
    """Every lowmem_r1/... file path the docs, recipes and the package's own text name -> where."""
    texts = [REPO / "README.md", REPO / "BENCHMARKS.md", *REPO.glob("docs/*.md"), *REPO.glob("recipes/*.toml"),
             *REPO.glob("lowmem_r1/**/*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("tests/*.py")]
    found: dict[str, list[str]] = {}
    for path in texts:
        for name in SOURCE_PATH.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def test_every_named_source_file_exists():
    """After files move, no page or message sends a reader to a file that is not there."""
    found = named_source_files()
    assert "lowmem_r1/config/recipe.py" in found  # the scan really reads
    missing = {name: where for name, where in found.items() if not (REPO / name).is_file()}
    assert missing == {}
