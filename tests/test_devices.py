"""Dtype and placement options: ``--dtype auto``, ``--device-map``, ``--max-memory``, and loading
under ``accelerate launch`` onto each process's own device."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_model_dir, write_word_text

from skipgpt import SkipGPTError
from skipgpt.cli import common, main
from skipgpt.devices import checkpoint_dtype, parse_max_memory, resolve_dtype


@pytest.mark.parametrize(("saved", "device", "expected"), [
    (torch.bfloat16, "cpu", torch.float32),  # a CPU computes in float32 whatever the checkpoint
    (torch.bfloat16, "cuda", torch.bfloat16),  # an accelerator keeps the checkpoint's dtype
    (torch.float16, "cuda:1", torch.float16),
    (None, "cuda", torch.float32),  # a checkpoint that does not say (a GGUF file)
])
def test_auto_dtype_is_the_checkpoints_on_an_accelerator_and_float32_on_a_cpu(saved, device, expected):
    assert resolve_dtype("auto", device, SimpleNamespace(dtype=saved)) is expected


def test_explicit_dtypes_and_config_spellings():
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert checkpoint_dtype(SimpleNamespace(dtype=None, torch_dtype="bfloat16")) is torch.bfloat16  # before transformers 5
    assert checkpoint_dtype(SimpleNamespace(dtype="torch.float16")) is torch.float16
    with pytest.raises(SkipGPTError, match="dtype must be one of"):
        resolve_dtype("float8", "cpu")


def test_max_memory_parses_devices_and_refuses_bad_pairs():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory(None) is None
    with pytest.raises(SkipGPTError, match="DEVICE=SIZE"):
        parse_max_memory("70GiB")


def args_for(tmp_path, **overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"model": str(tmp_path), "dtype": "auto", "device": "cpu", "device_map": None,
                              "max_memory": None, "offload_folder": None, **overrides})


class Launched:
    """What the ``Accelerator`` says in one of two processes started by ``accelerate launch``."""

    num_processes = 2
    device = torch.device("cpu", 1)


def test_each_launched_process_loads_onto_its_own_device(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(common, "load_model", lambda name, **kwargs: seen.update(kwargs) or ("model", "tokenizer"))
    monkeypatch.setattr(common, "Accelerator", Launched)
    common.load_from_args(args_for(tmp_path, device="cuda"))
    assert seen["device"] == torch.device("cpu", 1)  # not --device's cuda, every process's cuda:0
    with pytest.raises(SkipGPTError, match="one process"):
        common.load_from_args(args_for(tmp_path, device_map="auto"))


def test_max_memory_needs_a_device_map(tmp_path):
    with pytest.raises(SkipGPTError, match="--device-map"):
        common.load_from_args(args_for(tmp_path, max_memory="0=10GiB"))


def test_eval_runs_with_a_device_map_and_bf16(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    write_word_text(tmp_path / "test.txt", 600, seed=1)
    report = tmp_path / "eval.json"
    base = ["eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "test.txt"), "--seq-len", "32"]
    assert main([*base, "--json", str(report)]) == 0
    plain = json.loads(report.read_text())["results"][str(tmp_path / "test.txt")]
    assert main([*base, "--device-map", "auto", "--max-memory", "cpu=1GiB", "--json", str(report)]) == 0
    mapped = json.loads(report.read_text())["results"][str(tmp_path / "test.txt")]
    assert mapped["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    assert main([*base, "--dtype", "bfloat16", "--json", str(report)]) == 0
    half = json.loads(report.read_text())["results"][str(tmp_path / "test.txt")]
    assert half["ppl"] == pytest.approx(plain["ppl"], rel=0.02) and half["ppl"] != plain["ppl"]
