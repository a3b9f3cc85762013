"""The documentation: generated references up to date, README short, links that resolve, neutral words."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 260
# Words about how the project was built, not how to use it.
BUILD_HISTORY = re.compile(r"issue [0-9]+|\bsession\b|\blent\b", re.IGNORECASE)
# [text](target) and ![alt](target); the target up to whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return load_generator().generated()


@pytest.mark.parametrize("name", ["cli.md", "config.md"])
def test_generated_reference_is_current(generated: dict[str, str], name: str) -> None:
    on_disk = (DOCS / name).read_text(encoding="utf-8") if (DOCS / name).exists() else None
    if generated[name] != on_disk:
        pytest.fail(f"docs/{name} is stale: run python scripts/gen_docs.py", pytrace=False)


def test_generated_reference_is_deterministic(generated: dict[str, str]) -> None:
    again = load_generator().generated()
    assert again == generated
    for name, text in generated.items():
        assert str(ROOT) not in text, f"docs/{name} names a path on this machine"


def test_cli_reference_covers_every_command(generated: dict[str, str]) -> None:
    import typer.main

    from lmzoo.cli.app import app

    def names(command, path):
        yield " ".join(path)
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from names(sub, [*path, name])

    for name in names(typer.main.get_command(app), ["lmzoo"]):
        assert f"## `{name}`" in generated["cli.md"]


def test_config_reference_covers_every_field(generated: dict[str, str]) -> None:
    from lmzoo.config.schema import DataConfig, FinetuneConfig, SampleConfig, TrainConfig
    from lmzoo.models import MODEL_REGISTRY

    text = generated["config.md"]
    classes = [DataConfig, TrainConfig, FinetuneConfig, SampleConfig]
    classes += [info.config for info in MODEL_REGISTRY.values()]
    for cls in classes:
        for field in cls.model_fields:
            assert f"| `{field}` |" in text, f"{cls.__name__}.{field} missing from docs/config.md"
    for name in MODEL_REGISTRY:
        assert f"### `name: {name}`" in text
    # a field's `# comment` becomes its description
    assert "| `patience` | int (> 0) or null | `null` | early stopping: evals without improvement |" in text


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def readme_test_commands() -> list[str]:
    """The commands in the first code block of README's "Tests" part, comments stripped."""
    text = README.read_text(encoding="utf-8")
    part = re.search(r"^## Tests\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert part, "README.md has no '## Tests' part"
    block = re.search(r"^```[^\n]*\n(.*?)^```", part.group(1), re.MULTILINE | re.DOTALL)
    assert block, "README.md's Tests part shows no commands"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_shows_the_test_commands() -> None:
    commands = readme_test_commands()
    for command in ("pytest", "pytest -m reliability", "ruff check . && ruff format --check ."):
        assert command in commands, f"README.md's Tests part does not show `{command}`"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_build_history_words(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    found = sorted({match.group(0) for match in BUILD_HISTORY.finditer(text)})
    assert not found, f"{path.relative_to(ROOT)} says {found}: describe lmzoo, not how it was built"


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercase, punctuation dropped, spaces to dashes."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for match in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.MULTILINE):
        slug = "".join(ch for ch in match.group(1).lower() if ch.isalnum() or ch in " -_").replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http(s):, mailto:
        file_part, _, fragment = target.partition("#")
        linked = path.parent / file_part.split("?", 1)[0] if file_part else path
        if not linked.exists():
            broken.append(target)
        elif fragment and linked.suffix == ".md" and fragment not in heading_anchors(linked):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} has links to missing files or headings: {broken}"


def test_docs_index_lists_every_page() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"
    assert "python scripts/gen_docs.py" in index
