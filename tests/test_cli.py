"""Command line: bad input fails fast with exit code 2, a message, and no output directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, forbid_model_loading

from skipgpt.cli import main
from skipgpt.data import DATA_DIR_ENV


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Every case here must fail before the (large, downloaded) model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI loaded a model before validating its input")

    forbid_model_loading(monkeypatch, refuse)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# argv (OUT and MISSING are replaced by paths under tmp_path) -> message on stderr
BAD_INPUT = {
    "target 1.0": (["tune", "--target", "1.0", "--out", "OUT"], r"target sparsity must be in [0, 1), got 1.0"),
    "target -0.1": (["tune", "--target", "-0.1", "--out", "OUT"], r"target sparsity must be in [0, 1), got -0.1"),
    "target=-0.1": (["tune", "--target=-0.1", "--out", "OUT"], r"target sparsity must be in [0, 1), got -0.1"),
    "zero steps": (["tune", "--steps", "0", "--out", "OUT"], "steps must be at least 1"),
    "missing data file": (["tune", "--data", "MISSING", "--out", "OUT"], "neither a named set"),
    "named set without train split": (["tune", "--data", "wikitext2", "--out", "OUT"], "has no 'train' split"),
    "named set without data dir": (["tune", "--data", "c4", "--out", "OUT"], f"set {DATA_DIR_ENV}=DIR"),
    "eval missing data file": (["eval", "--data", "MISSING"], "neither a named set"),
    "eval second spec missing": (["eval", "--data", "pydoc,MISSING"], "neither a named set"),
    "eval without data dir": (["eval"], f"set {DATA_DIR_ENV}=DIR"),
}


def fill(argv, tmp_path):
    paths = {"OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing.txt")}
    return [paths.get(a, a) for a in argv]


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_message_and_no_output(case, tmp_path, capsys):
    argv, message = BAD_INPUT[case]
    assert main(fill(argv, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("skipgpt: error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_finished_output_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["tune", "--data", "pydoc", "--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["results.json"]


def test_unfinished_run_needs_resume(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "trainer_state.json").write_text("{}")
    assert main(["tune", "--data", "pydoc", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "checkpoint" / "trainer_state.json").exists()


ARGPARSE_ERRORS = {
    "no command": [],
    "tune without --out": ["tune"],
    "unknown unit": ["tune", "--out", "x", "--target-unit", "layers"],
    "unknown loss": ["tune", "--out", "x", "--loss", "mse"],
    "non-numeric target": ["tune", "--out", "x", "--target", "half"],
}


@pytest.mark.parametrize("case", list(ARGPARSE_ERRORS))
def test_usage_errors_exit_2(case, capsys):
    with pytest.raises(SystemExit) as exc:
        main(ARGPARSE_ERRORS[case])
    assert exc.value.code == 2
    assert "usage: skipgpt" in capsys.readouterr().err


def test_python_m_skipgpt_help():
    proc = subprocess.run(
        [sys.executable, "-m", "skipgpt", "--help"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: skipgpt")
    assert all(command in proc.stdout for command in ("info", "tune", "eval", "demo"))


def test_tune_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(option in out for option in ("--target", "--target-unit", "--resume", "--loss", "--router"))
