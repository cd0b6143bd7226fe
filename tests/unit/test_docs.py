"""The docs tell the truth where a test can hold them to the code: every exit code stated
anywhere (docs, worker.yaml, every command's --help) means what exitcodes.py says, and no
link points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from dlq_worker import exitcodes
from dlq_worker.cli import cli

ROOT = Path(__file__).resolve().parents[2]

#: Words one of which a sentence stating a code must hold near it, by code.
_MEANS = {
    1: ("unexpected",),
    2: ("usage",),
    3: ("config", "key", "value"),
    4: ("reach", "start", "server", "connect"),
    5: ("not found", "no event", "not there", "not parked"),
    6: ("warn",),
    7: ("fail",),
    8: ("tamper", "does not", "verif"),
    9: ("room", "cap", "full"),
    130: ("signal",),
}
_STATED = re.compile(r"\bexit(?:s|ed)?(?: code)?\s+(\d+)", re.IGNORECASE)
#: The codes listed after one: "exit 0 pass, 6 warn, 7 fail", "0 when ..., 8 when ...".
_LISTED = re.compile(r"[^.;]*?(?:,|\bor|\band)\s+(\d+)(?=\s+(?:when|warn|fail|if|on)\b)")


def _help_texts() -> dict[str, str]:
    texts: dict[str, str] = {}

    def walk(command: click.Command, path: list[str]) -> None:
        with click.Context(command, info_name=" ".join(path)) as ctx:
            texts["dlq-worker " + " ".join(path[1:]) + " --help"] = command.get_help(ctx)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
    walk(cli, ["dlq-worker"])
    return texts


def _documents() -> dict[str, str]:
    files = [ROOT / "README.md", ROOT / "worker.yaml", ROOT / "charts/dlq-worker/README.md",
             *sorted((ROOT / "docs").glob("*.md"))]
    return {str(f.relative_to(ROOT)): f.read_text() for f in files} | _help_texts()


def test_the_exit_code_table_is_the_code_table() -> None:
    text = (ROOT / "docs/operations.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", text, flags=re.MULTILINE))
    assert {int(k): v for k, v in rows.items()} == exitcodes.TABLE
    assert len(set(exitcodes.TABLE)) == len(exitcodes.TABLE)


@pytest.mark.parametrize("name", sorted(_documents()))
def test_every_exit_code_stated_means_what_the_code_table_says(name: str) -> None:
    text = " ".join(_documents()[name].split())
    stated: list[tuple[int, int]] = []  # (code, where its meaning starts)
    for match in _STATED.finditer(text):
        stated.append((int(match.group(1)), match.end()))
        rest = match.end()
        while listed := _LISTED.match(text, rest):
            stated.append((int(listed.group(1)), listed.end()))
            rest = listed.end()
    wrong = []
    for code, at in stated:
        assert code in exitcodes.TABLE, f"{name}: exit {code} is no code of ours"
        if code == 0:
            continue  # success: said in as many ways as there are commands
        after = text[at:at + 80]
        # "exit code 3: a startup failure" defines it after; elsewhere it may come before
        near = (after if after.lstrip().startswith(":") else
                text[max(0, at - 50):at + 80]).lower()
        if not any(word in near for word in _MEANS[code]):
            wrong.append(f"exit {code} ({exitcodes.TABLE[code]}) in: ...{near}...")
    assert not wrong, f"{name}:\n" + "\n".join(wrong)


def test_no_link_points_outside_the_repository() -> None:
    for name, text in _documents().items():
        for target in re.findall(r"\]\(([^)]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            base = ROOT / name if not name.endswith("--help") else ROOT
            path = (base.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT), f"{name} links outside the repository: {target}"
            assert path.exists(), f"{name} links to a missing file: {target}"


def test_the_readme_is_a_front_page() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("name", sorted(n for n in _help_texts() if n.count(" ") > 1))
def test_every_command_has_an_example_in_its_help(name: str) -> None:
    command = _help_texts()[name]
    if "Commands:" in command:
        return  # a group: its commands have theirs
    assert "Example:" in command, f"{name} has no example"


def test_usage_mistakes_are_usage_errors() -> None:
    from click.testing import CliRunner
    runner = CliRunner()
    replay = runner.invoke(cli, ["dead-letter", "replay"])
    assert replay.exit_code == exitcodes.USAGE and "--all" in replay.output
    purge = runner.invoke(cli, ["dead-letter", "purge", "--yes"])
    assert purge.exit_code == exitcodes.USAGE
    chains = runner.invoke(cli, ["verify-chain"])
    assert chains.exit_code == exitcodes.USAGE
    assert "give one or more CORRELATION_IDs, or --all" in chains.output
