"""The README is a guide users copy from: every `ltr-search` command it shows names a real
subcommand and real flags, every table renders (one column count per table), and the "your own
documents" commands run as written."""
from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import httpx
import pytest

from search.app.cli.main import build_parser
from tests.conftest import home_sharing_encoder, run_cli, running_service

README = Path(__file__).resolve().parents[1] / "README.md"


def _code_lines() -> list[str]:
    """Shell lines of the README's code blocks, continuation lines joined, comments dropped."""
    lines, block = [], None
    for raw in README.read_text().splitlines():
        if raw.startswith("```"):
            block = None if block is not None else raw[3:].strip()
            continue
        if block in ("bash", ""):
            lines.append(raw)
    joined = "\n".join(lines).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s#\s.*$", "", line).strip()
        if not line.startswith("ltr-search"):
            continue
        first, *alternatives = line.split(" | ")  # `ltr-search models list [--json] | show VERSION | rollback`
        commands.append(first)
        group = first.split()[1]
        commands += [f"ltr-search {group} {alternative}" for alternative in alternatives]
    return commands


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


COMMANDS = _code_lines()


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_names_a_real_subcommand_and_real_flags(command: str):
    words = shlex.split(command)[1:]
    parser = build_parser()
    known = set(_options(parser))
    path = []
    while True:
        children = _subparsers(parser)
        word = next((w for w in words if not w.startswith("-") and not w.startswith("[")), None)
        if not children or word is None:
            break
        assert word in children, f"{command}: '{' '.join(path + [word])}' is not a command"
        path.append(word)
        parser = children[word]
        known |= _options(parser)
        words = words[words.index(word) + 1:]
    flags = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", command.split(" ", 1)[1]))
    unknown = sorted(flag for flag in flags if flag not in known)
    assert not unknown, f"{command}: unknown flags {unknown} for '{' '.join(path)}'"


def test_every_table_renders():
    rows: list[str] = []
    for line in README.read_text().splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line)
            continue
        if rows:
            widths = {len(re.split(r"(?<!\\)\|", row.strip().strip("|"))) for row in rows}
            assert len(widths) == 1, f"table starting {rows[0]!r} has rows of {sorted(widths)} columns"
            assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rows[1].replace(" ", "")), f"{rows[0]!r}: no separator row"
            rows = []


def test_your_own_documents_in_three_commands(tmp_path: Path, shared_encoder_home: Path):
    """The README's JSONL example, built, searched and served as the README says."""
    home = home_sharing_encoder(tmp_path / "home", shared_encoder_home)
    text = README.read_text()
    example = text[text.index("```jsonl") + len("```jsonl"):].split("```", 1)[0].strip().splitlines()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(example) + "\n")
    run_cli(home, "index", "build", "--dataset", str(docs), "--name", "mine", "--quiet")
    found = run_cli(home, "search", "vitamin d bones", "--name", "mine", "-k", "5", "--json")
    assert json.loads(found.stdout)["hits"][0]["id"] == "d1"
    with running_service(home, "--name", "mine", "--threads", "1") as (url, _):
        page = httpx.post(f"{url}/search", json={"query": "vitamin d bones", "size": 5,
                                                 "filters": {"year": {"gte": 2010}}}, timeout=30).json()
        assert [r["id"] for r in page["results"]][0] == "d1"
        stored = httpx.post(f"{url}/events", json={"events": [
            {"request_id": page["request_id"], "type": "click", "doc_id": "d1", "position": 1}]}, timeout=30).json()
        assert stored == {"stored": 1, "duplicates": 0}
        wrong_type = httpx.post(f"{url}/search", json={"query": "statins", "filters": {"year": "2010"}}, timeout=30)
        assert wrong_type.status_code == 400 and "holds numbers" in wrong_type.text
        docs_page = httpx.get(f"{url}/docs", timeout=30)
        assert docs_page.status_code == 200
