"""Every command's bad input: exit 2, one line naming the problem, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalestudy.cli import main

STUDY_COMMANDS = (["validate"], ["plan"], ["plan", "--json"], ["run"])
RUN_DIR_COMMANDS = (["status"], ["status", "--json"], ["report"], ["cancel"], ["dashboard", "--port", "0"])


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def one_line_error(capsys: pytest.CaptureFixture[str], *names: str) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and "Traceback" not in captured.err + captured.out
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # `run` would write under ./runs
    (tmp_path / "malformed.yaml").write_text("name: broken\n\tbase: 1\n")  # a tab on line 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a run directory")
    (tmp_path / "good.yaml").write_text("name: good\n")
    return tmp_path


@pytest.mark.parametrize("command", STUDY_COMMANDS, ids=" ".join)
def test_a_study_command_names_a_malformed_missing_or_foreign_study_file(command, workdir, capsys):
    before = files_under(workdir)
    assert main([*command, "malformed.yaml"]) == 2
    one_line_error(capsys, "malformed.yaml", "line 2")
    assert main([*command, "absent.yaml"]) == 2
    one_line_error(capsys, "absent.yaml", "cannot read")
    assert main([*command, "foreign"]) == 2
    one_line_error(capsys, "foreign", "cannot read")
    assert files_under(workdir) == before


@pytest.mark.parametrize("command", (["plan"], ["run"]), ids=" ".join)
def test_an_unknown_executor_is_named_with_the_choices(command, workdir, capsys):
    before = files_under(workdir)
    assert main([*command, "good.yaml", "--executor", "kubernetes"]) == 2
    one_line_error(capsys, "executor.kind", "kubernetes", "local")
    assert files_under(workdir) == before


@pytest.mark.parametrize("command", RUN_DIR_COMMANDS, ids=" ".join)
def test_a_run_directory_command_names_a_missing_or_foreign_directory(command, workdir, capsys):
    before = files_under(workdir)
    for where, words in (("absent", ("absent", "no such directory")),
                         ("foreign", ("foreign", "not a run directory")),
                         ("good.yaml", ("good.yaml", "no such directory"))):
        assert main([command[0], where, *command[1:]]) == 2
        one_line_error(capsys, *words)
    assert files_under(workdir) == before


def test_an_unknown_command_or_flag_exits_2_with_usage(capsys):
    assert main(["train", "x.yaml"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["status"]) == 2
    assert "run_dir" in capsys.readouterr().err
