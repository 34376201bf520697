"""Faults a user meets: a real `skipgpt` process SIGKILLed at the worst moments, checkpoints that
must not run code, two runs on one --out, a non-finite loss, output paths that cannot be written.

The kill tests run the CLI in a subprocess on a tiny model and stop it at a pause point
(skipgpt/pause.py); the resumed run and the uninterrupted reference run in this process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_same_tensors, forbid_model_loading, interrupt_tune_after, save_tiny_model_dir, write_word_text
from safetensors.torch import load_file

import skipgpt.inference.export
import skipgpt.training.tune
from skipgpt import SkipGPTError
from skipgpt.cli import main
from skipgpt.lock import LOCK_NAME, output_lock
from skipgpt.pause import MARKER_ENV, PAUSE_ENV
from skipgpt.training import checkpoint

TUNE = ["--steps", "6", "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2", "--save-every", "2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    save_tiny_model_dir(root / "model")
    write_word_text(root / "train.txt", 8000, seed=0)
    write_word_text(root / "test.txt", 1000, seed=1)
    return root


def tune_argv(workspace: Path, out: Path, *extra: str) -> list[str]:
    return ["tune", "--model", str(workspace / "model"), "--data", str(workspace / "train.txt"), *TUNE, *extra, "--out", str(out)]


@pytest.fixture(scope="module")
def straight(workspace) -> Path:
    """The uninterrupted run every killed-and-resumed one must equal."""
    out = workspace / "straight"
    assert main(tune_argv(workspace, out)) == 0
    return out


def kill_at(point: str, argv: list[str], tmp_path: Path) -> None:
    """Run ``python -m skipgpt ARGV`` until it reaches pause point ``point``, then SIGKILL it."""
    marker, log = tmp_path / "paused", tmp_path / "killed_stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", PAUSE_ENV: point, MARKER_ENV: str(marker)}
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "skipgpt", *argv], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 300  # a safety net against a hung run, not a timing assertion
            while not marker.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the run never reached {point}: {log.read_text()[-3000:]}")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def assert_no_half_written_files(out: Path) -> None:
    """Every file under its final name loads completely; temp files and staging have dot names."""
    for path in sorted(out.rglob("*")):
        if path.is_dir() or any(part.startswith(".") for part in path.relative_to(out).parts):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            load_file(str(path))
    found = checkpoint.find(out)
    if found is not None:
        checkpoint.load(found, 0)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def without_times(record: dict) -> dict:
    """``record`` less its durations (keys ending in _s), which no two runs share."""
    return {k: without_times(v) if isinstance(v, dict) else v for k, v in record.items() if not k.endswith("_s")}


def assert_same_run(out: Path, straight: Path) -> None:
    assert_same_tensors(load_file(str(out / "routers.safetensors")), load_file(str(straight / "routers.safetensors")))
    assert json.loads((out / "router_config.json").read_text())["router"] == json.loads((straight / "router_config.json").read_text())["router"]
    assert [without_times(line) for line in read_log(out)] == [without_times(line) for line in read_log(straight)]
    results, expected = (json.loads((d / "results.json").read_text()) for d in (out, straight))
    assert results.pop("command").endswith(" --resume --out " + str(out))  # the command that finished the run
    expected.pop("command")
    assert without_times(results) == without_times(expected)
    assert not (out / LOCK_NAME).exists() and checkpoint.find(out) is None


# ---- SIGKILL and --resume ---------------------------------------------------------------------


def test_kill_between_steps_then_resume_equals_straight_run(workspace, straight, tmp_path):
    out = tmp_path / "run"
    kill_at("step@6", tune_argv(workspace, out), tmp_path)  # steps 0-4 done, checkpoint after step 4
    assert_no_half_written_files(out)
    assert [line["step"] for line in read_log(out)] == [0, 1, 2, 3, 4]
    assert checkpoint.load_trainer_state(checkpoint.find(out))["step"] == 4
    assert (out / LOCK_NAME).exists()  # SIGKILL leaves the lock; the resume takes it over
    assert main(tune_argv(workspace, out, "--resume")) == 0
    assert_same_run(out, straight)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(workspace, straight, tmp_path):
    out = tmp_path / "run"
    kill_at("checkpoint-write@2", tune_argv(workspace, out), tmp_path)  # the checkpoint of step 4, half staged
    assert_no_half_written_files(out)
    assert (out / ".checkpoint.tmp" / "weights.safetensors").is_file()
    assert checkpoint.load_trainer_state(checkpoint.find(out))["step"] == 2
    assert main(tune_argv(workspace, out, "--resume")) == 0
    assert_same_run(out, straight)
    assert not (out / ".checkpoint.tmp").exists()


def test_kill_during_calibration_then_resume_calibrates_the_same(workspace, straight, tmp_path):
    out = tmp_path / "run"
    kill_at("calibration", tune_argv(workspace, out), tmp_path)
    assert_no_half_written_files(out)
    assert not (out / "routers.safetensors").exists() and not (out / "results.json").exists()
    assert checkpoint.load_trainer_state(checkpoint.find(out))["step"] == 6  # training had finished
    assert main(tune_argv(workspace, out, "--resume")) == 0
    assert_same_run(out, straight)


COMPARE = ["--methods", "skipgpt-rt,shortgpt", "--no-dense", "--ratio", "0.34", "--steps", "2", "--seq-len", "32",
           "--max-windows", "2", "--calib-sequences", "2", "--calib-seq-len", "64"]


def test_kill_compare_between_methods_then_rerun_equals_straight_run(workspace, tmp_path):
    def argv(out: Path) -> list[str]:
        return ["compare", "--model", str(workspace / "model"), "--data", str(workspace / "train.txt"),
                "--eval", str(workspace / "test.txt"), *COMPARE, "--out", str(out)]

    out, reference = tmp_path / "cmp", tmp_path / "reference"
    kill_at("compare-row", argv(out), tmp_path)  # the skipgpt-rt row is written, shortgpt not started
    assert_no_half_written_files(out)
    assert (out / "skipgpt-rt_0.34" / "row.json").is_file() and not (out / "shortgpt_0.34").exists()
    assert main(argv(out)) == 0
    assert main(argv(reference)) == 0
    routers = "skipgpt-rt_0.34/routers.safetensors"
    assert_same_tensors(load_file(str(out / routers)), load_file(str(reference / routers)))
    rows, expected = (json.loads((d / "comparison.json").read_text())["rows"] for d in (out, reference))
    drop = lambda row: {k: v for k, v in without_times(row).items() if k not in ("artifacts", "command")}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in expected]
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("stop, scored_again", [("compare-eval@1", 3), ("compare-eval@3", 1)])
def test_a_row_stopped_during_its_evaluation_resumes_at_the_set_it_was_in(workspace, tmp_path, monkeypatch, stop, scored_again):
    """Killed after the first of two evaluation sets of the routed row (@1: its routers are trained)
    or of the pruned row (@3: pruned and saved): the rerun scores only what is missing, prunes
    nothing again, and its rows equal an uninterrupted run's."""
    second = workspace / "test2.txt"
    if not second.exists():
        write_word_text(second, 1000, seed=2)

    def argv(out: Path) -> list[str]:
        return ["compare", "--model", str(workspace / "model"), "--data", str(workspace / "train.txt"),
                "--eval", f"{workspace / 'test.txt'},{second}", *COMPARE, "--out", str(out)]

    out, reference = tmp_path / "cmp", tmp_path / "reference"
    kill_at(stop, argv(out), tmp_path)
    assert_no_half_written_files(out)
    row = out / ("skipgpt-rt_0.34" if stop.endswith("@1") else "shortgpt_0.34")
    assert [p.name[:13] for p in (row / "partial").glob("ppl_*.json")] == ["ppl_test.txt-"] and not (row / "row.json").exists()
    import skipgpt.baselines.compare as compare
    from skipgpt.baselines.registry import STATIC

    scored, pruned = [], []
    real_perplexity, real_prune = compare.perplexity, STATIC["shortgpt"].prune
    monkeypatch.setattr(compare, "perplexity", lambda *a, **kw: scored.append(kw["desc"]) or real_perplexity(*a, **kw))
    monkeypatch.setitem(STATIC, "shortgpt", dataclasses.replace(STATIC["shortgpt"], prune=lambda *a: pruned.append(1) or real_prune(*a)))
    assert main(argv(out)) == 0
    assert len(scored) == scored_again and len(pruned) == (1 if stop.endswith("@1") else 0)
    assert not list(out.glob("*/partial"))  # a finished row holds everything
    monkeypatch.undo()
    assert main(argv(reference)) == 0
    rows, expected = (json.loads((d / "comparison.json").read_text())["rows"] for d in (out, reference))
    drop = lambda row: {k: v for k, v in without_times(row).items() if k not in ("artifacts", "command")}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in expected]


def test_partial_evaluations_of_another_model_are_dropped(tmp_path):
    from skipgpt.baselines.partial import partial_dir as _partial_dir

    partial = _partial_dir(tmp_path, "results.json:aaa")
    (partial / "ppl_test.json").write_text("{}")
    assert _partial_dir(tmp_path, "results.json:aaa") == partial and (partial / "ppl_test.json").exists()
    assert not (_partial_dir(tmp_path, "results.json:bbb") / "ppl_test.json").exists()  # retrained: scored anew
    assert (partial / "model.txt").read_text() == "results.json:bbb"


# ---- checkpoints never unpickle ---------------------------------------------------------------


class RunsCode:
    """Unpickling this creates a directory: what any code a hostile pickle names could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def plant_checkpoint(out: Path, files: dict[str, object]) -> Path:
    path = out / "checkpoint"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": 2, "elapsed_s": 1.0, "world_size": 1, "fingerprint": {}}))
    for name, payload in files.items():
        torch.save(payload, path / name)
    return path


def test_a_pickled_old_format_checkpoint_is_refused_without_running_it(workspace, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "code_ran"
    path = plant_checkpoint(out, {"optim.pt": RunsCode(marker), "rng_0.pt": RunsCode(marker)})
    for extra in ((), ("--resume",)):
        assert main(tune_argv(workspace, out, *extra)) == 2
        err = capsys.readouterr().err
        assert f"skipgpt: error: {path} was written by an older skipgpt in a format that can run code" in err
        assert f"delete {path} and start the run again" in err
    assert not marker.exists()
    torch.load(path / "optim.pt", weights_only=False)  # the planted file really runs code when unpickled
    assert marker.exists()


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_checkpoint_state_round_trips_exactly_one_rng_file_per_rank(tmp_path):
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for _ in range(2):
        param.grad = torch.randn(4)
        optimizer.step()
        scheduler.step()
    expected = {}
    for rank in (0, 1):  # what two data-parallel processes would each write
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(rank)
        checkpoint.write_rank_state(tmp_path, rank)
        expected[rank] = draws()
    checkpoint.write_main_state(tmp_path, {"w": param.detach()}, optimizer, scheduler, {"step": 2})
    checkpoint.commit(tmp_path)
    path = checkpoint.find(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["optim.safetensors", "rng_0.safetensors", "rng_1.safetensors",
                                                      "trainer_state.json", "weights.safetensors"]
    for rank in (0, 1):
        saved = checkpoint.load(path, rank)
        checkpoint.set_rng_state(saved["rng"])
        assert draws() == expected[rank]
    assert saved["optim"]["scheduler"] == scheduler.state_dict()
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))], lr=1e-2)
    restored.load_state_dict(saved["optim"]["optimizer"])
    assert restored.param_groups[0]["betas"] == (0.9, 0.95)
    assert_same_tensors(restored.state_dict()["state"][0], optimizer.state_dict()["state"][0])


def test_a_pickle_under_the_new_names_is_refused_as_damaged(tmp_path):
    marker = tmp_path / "code_ran"
    path = plant_checkpoint(tmp_path, {name: RunsCode(marker) for name in ("weights.safetensors", "optim.safetensors",
                                                                           "rng_0.safetensors")})
    with pytest.raises(SkipGPTError, match=f"the checkpoint {path} is damaged .*; delete it and start the run again"):
        checkpoint.load(checkpoint.find(tmp_path), 0)
    assert not marker.exists()


def interrupted(workspace: Path, out: Path, monkeypatch, calls: int, *extra: str) -> None:
    """A run that dies (Ctrl-C) inside the (calls+1)-th micro-batch, its checkpoints kept."""
    interrupt_tune_after(monkeypatch, calls)
    with pytest.raises(KeyboardInterrupt):
        main(tune_argv(workspace, out, *extra))
    monkeypatch.undo()


def test_a_log_line_cut_short_is_dropped_on_resume(workspace, straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted(workspace, out, monkeypatch, 3)  # steps 0-2 logged, checkpoint after step 2
    with (out / "train_log.jsonl").open("a") as log:
        log.write('{"step": 3, "loss": 2.')  # what a power cut in the middle of a write can leave
    assert main(tune_argv(workspace, out, "--resume")) == 0
    assert_same_run(out, straight)


def test_a_damaged_checkpoint_is_refused(workspace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(workspace, out, monkeypatch, 3)
    weights = out / "checkpoint" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    assert main(tune_argv(workspace, out, "--resume")) == 2
    assert f"the checkpoint {out / 'checkpoint'} is damaged" in capsys.readouterr().err


def test_resuming_with_another_number_of_processes_is_refused(workspace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(workspace, out, monkeypatch, 3)
    state_file = out / "checkpoint" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "world_size": 2}))
    assert main(tune_argv(workspace, out, "--resume")) == 2
    assert "was written by 2 process(es), this run has 1; resume it with the same number" in capsys.readouterr().err


# ---- a non-finite loss ------------------------------------------------------------------------


def poison_loss_from(monkeypatch, call: int) -> None:
    real, count = skipgpt.training.tune.routed_loss, [0]

    def poisoned(*args, **kwargs):
        count[0] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan"), parts) if count[0] >= call else (loss, parts)

    monkeypatch.setattr(skipgpt.training.tune, "routed_loss", poisoned)


def test_a_non_finite_loss_stops_keeps_the_checkpoint_and_resumes_with_a_lower_lr(workspace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison_loss_from(monkeypatch, 4)  # step 3 (one micro-batch per step)
    assert main(tune_argv(workspace, out)) == 2
    assert ("skipgpt: error: non-finite loss at step 3; the checkpoint of step 2 is kept: continue with --resume "
            "and a lower --lr") in capsys.readouterr().err
    assert checkpoint.load_trainer_state(checkpoint.find(out))["step"] == 2
    assert not (out / "results.json").exists() and not (out / LOCK_NAME).exists()
    monkeypatch.undo()

    assert main(tune_argv(workspace, out, "--resume", "--lr", "5e-3")) == 0
    assert "resuming at step 2 with learning rate(s) 0.005 instead of 0.01" in capsys.readouterr().err
    assert [(line["step"], line["lr"]) for line in read_log(out)] == [(0, 1e-2), (1, 1e-2)] + [(s, 5e-3) for s in range(2, 6)]
    assert json.loads((out / "results.json").read_text())["tune"]["lr"] == 5e-3


def test_a_non_finite_loss_before_any_checkpoint_leaves_nothing(workspace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison_loss_from(monkeypatch, 1)
    assert main(tune_argv(workspace, out)) == 2
    assert "non-finite loss at step 0; no checkpoint was saved yet: start again with a lower --lr" in capsys.readouterr().err
    assert not out.exists()


# ---- one writer per --out ---------------------------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Refusals about --out must come before the model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model before checking --out")

    forbid_model_loading(monkeypatch, refuse)
    monkeypatch.setattr(skipgpt.inference.export, "load_model", refuse)


def test_a_second_run_on_a_locked_out_is_refused(workspace, tmp_path, capsys, no_model_loading):
    out = tmp_path / "run"
    with output_lock(out, "skipgpt tune"):
        held = (out / LOCK_NAME).read_text()
        assert main(tune_argv(workspace, out)) == 2
        err = capsys.readouterr().err
        assert f"skipgpt: error: {out} is being written by process {os.getpid()} on " in err
        assert "(skipgpt tune, started " in err and "wait for it or pick another --out" in err
        assert (out / LOCK_NAME).read_text() == held  # the refused run leaves the holder's lock alone
    assert not out.exists()  # the lock made the directory and takes it away again, being empty


def test_a_lock_held_on_another_host_is_refused(workspace, tmp_path, capsys, no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "skipgpt tune", "started": "then"}))
    assert main(tune_argv(workspace, out)) == 2
    assert f"{out} is being written by process 1 on elsewhere (skipgpt tune, started then)" in capsys.readouterr().err


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(workspace, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "skipgpt tune",
                                             "started": "then"}))
    assert main(tune_argv(workspace, out)) == 0
    assert (out / "routers.safetensors").is_file() and not (out / LOCK_NAME).exists()


def test_the_lock_is_released_after_a_failing_run(workspace, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert main(tune_argv(workspace, out, "--seq-len", "100000")) == 2  # fails after the model is loaded
    assert list(out.iterdir()) == []


# ---- output paths that cannot be written ------------------------------------------------------


def out_argv(command: str, workspace: Path, out: Path) -> list[str]:
    data = ["--data", str(workspace / "train.txt")]
    return {
        "tune": tune_argv(workspace, out),
        "finetune": ["finetune", "--dense", *data, "--out", str(out)],
        "compare": ["compare", *data, "--eval", str(workspace / "test.txt"), "--out", str(out)],
        "export": ["export", "--out", str(out)],
    }[command]


UNWRITABLE = {
    "a regular file": (lambda tmp: tmp / "file", "is a file, not a directory; pick another --out"),
    "below a regular file": (lambda tmp: tmp / "file" / "out", "(Not a directory); pick a directory you can write to"),
}


@pytest.mark.parametrize("case", list(UNWRITABLE))
@pytest.mark.parametrize("command", ["tune", "finetune", "compare", "export"])
def test_an_unwritable_out_fails_before_any_work(command, case, workspace, tmp_path, capsys, no_model_loading):
    (tmp_path / "file").write_text("not a directory")
    where, message = UNWRITABLE[case]
    assert main(out_argv(command, workspace, where(tmp_path))) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_out_in_a_read_only_directory_fails_before_any_work(workspace, tmp_path, capsys, no_model_loading):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        for out, message in ((locked / "out", "cannot create --out"), (locked, "cannot write to --out")):
            assert main(tune_argv(workspace, out)) == 2
            assert f"{message} {out} (Permission denied); pick a directory you can write to" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)
