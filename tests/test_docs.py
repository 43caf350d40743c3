"""The docs name only what exists: every repository path, link, `skyferry` subcommand and
option that README.md and docs/*.md mention."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main

from skyferry.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# the repository's own top level: a path that starts here must exist
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - {"tools", "build"}
# other tools whose options a line may name
OTHER_TOOLS = ("prefect ", "pytest", "python", "setup_local", "pip ", "make ", "rclone", "fio",
               "npm ", "uvicorn", "git ", "chromium")


def _spans(text: str) -> list[tuple[str, str]]:
    """Inline code spans, each with its paragraph (or list item, or table row), and the
    commands of fenced code blocks (a line ending in a backslash joined to the next), each
    its own context."""
    spans = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            spans.append((command, command))
    text = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    for paragraph in re.split(r"\n\s*\n|\n(?=[|-] )", text):  # a list item or row is its own
        spans += [(span, paragraph) for span in re.findall(r"`([^`\n]+)`", paragraph)]
    return spans


def _commands() -> dict[str, Any]:
    """Every subcommand (a click command), by its words (``run``, ``api status``)."""
    root = typer.main.get_command(app)
    assert len(getattr(root, "commands", {})) > 5
    found: dict[str, Any] = {}

    def walk(group: Any, prefix: str) -> None:
        for name, command in group.commands.items():
            found[prefix + name] = command
            if hasattr(command, "commands"):
                walk(command, f"{prefix}{name} ")

    walk(root, "")
    return found


def _options(command: Any) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)
            if o.startswith("-")} | {"--help"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_and_link_in_the_docs_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # markdown links
        if "://" not in target and not (doc.parent / target).exists():
            missing.append(f"link {target}")
    for span, _ in _spans(text):
        for token in re.findall(r"[\w./-]+", span):
            token = token.rstrip(".,:")
            first = token.split("/")[0]
            if first not in TOP or "/" not in token and "." not in token:
                continue
            if not (ROOT / token).exists():
                missing.append(f"path {token}")
    assert missing == [], f"{doc.name} names what is not there: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_skyferry_subcommand_and_option_in_the_docs_exists(doc: Path) -> None:
    commands = _commands()
    every_option = set().union(*(_options(c) for c in commands.values()))
    wrong = []
    for span, context in _spans(doc.read_text()):
        line = span.split(" #")[0]
        used = re.search(r"\bskyferry ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", line)
        if used and not line.lstrip().startswith(("from ", "import ")):
            first, second = used.group(1), used.group(2)
            name = f"{first} {second}" if f"{first} {second}" in commands else first
            if name not in commands:
                wrong.append(f"subcommand `skyferry {name}`")
                continue
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line[used.end():]):
                if option not in _options(commands[name]):
                    wrong.append(f"option {option} of `skyferry {name}`")
        elif not any(tool in context for tool in OTHER_TOOLS):
            for option in re.findall(r"^(--[a-z][a-z-]*)(?:[ =]|$)", line.strip()):
                if option not in every_option:
                    wrong.append(f"option {option}")
    assert wrong == [], f"{doc.name} names what skyferry does not have: {wrong}"
