"""Routers saved apart from the base model (PEFT-style) and loaded back onto a copy of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from skipgpt import (
    RouterConfig,
    SkipGPTError,
    attach_routers,
    has_routers,
    load_routers,
    router_parameters,
    routing_state,
    save_routers,
    set_gate_mode,
)
from skipgpt.identity import weights_fingerprint

IDS = random_ids(2, 12, seed=3)


def trained_like(arch: str, **config) -> torch.nn.Module:
    """A tiny model with routers whose weights are not what a fresh attach would give."""
    model = tiny_model(arch, seed=0)
    attach_routers(model, RouterConfig(init_bias=0.0, **config))
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in router_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator))
    routing_state(model).config.threshold = 0.25  # as calibration would set it
    return model


@torch.no_grad()
def argmax_run(model) -> tuple[torch.Tensor, torch.Tensor]:
    set_gate_mode(model, "argmax")
    out = model(input_ids=IDS).logits
    return out, routing_state(model).stacked_gates().clone()


@pytest.fixture
def saved(tmp_path) -> Path:
    save_routers(trained_like("llama"), tmp_path / "routers")
    return tmp_path / "routers"


def test_round_trip_gives_identical_argmax_outputs(arch, tmp_path):
    model = trained_like(arch)
    logits, gates = argmax_run(model)
    assert 0 < gates.mean() < 1
    save_routers(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router_config.json", "routers.safetensors"]

    fresh = tiny_model(arch, seed=0)
    load_routers(fresh, tmp_path)
    logits2, gates2 = argmax_run(fresh)
    assert torch.equal(gates2, gates)
    assert torch.equal(logits2, logits)
    assert routing_state(fresh).config == routing_state(model).config


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_saved_files_describe_the_routers(tmp_path, kind):
    model = trained_like("llama", router=kind)
    save_routers(model, tmp_path, extra={"training": {"steps": 7}})
    config = json.loads((tmp_path / "router_config.json").read_text())
    assert config["format"] == "skipgpt-routers" and config["version"] == 2
    assert config["training"] == {"steps": 7}
    assert config["router"] | {"base_model": ""} == {
        "router": kind, "input_norm": True, "init": "execute", "init_bias": 0.0, "threshold": 0.25, "kv_policy": "keep",
        "routing": "skipgpt", "capacity": 1.0, "replacement": "lowrank", "replacement_rank": 16,
        "model_type": "llama", "hidden_size": 32, "num_layers": 3, "base_model": "", "base_revision": "",
        "base_fingerprint": weights_fingerprint(model),
    }
    tensors = load_file(str(tmp_path / "routers.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in router_parameters(model))
    assert all(k.startswith(("layers.0.", "layers.1.", "layers.2.")) for k in tensors)


def test_saved_routers_do_not_contain_base_weights(saved):
    tensors = load_file(str(saved / "routers.safetensors"))
    assert all(".attn." in k or ".mlp." in k for k in tensors)
    assert all(t.shape[-1] in (32, 2, 16) or t.dim() == 1 for t in tensors.values())
    # Router nets and the rank-16 replacements: (66 + 32 + 2 * 32 * 16) floats for each of 6 modules.
    assert sum(t.numel() for t in tensors.values()) == 6 * (66 + 32 + 2 * 32 * 16)
    assert (saved / "routers.safetensors").stat().st_size < 6 * (66 + 32 + 2 * 32 * 16) * 4 + 4096


WRONG_BASE = {
    "other architecture": dict(arch="mistral"),
    "other hidden size": dict(arch="llama", hidden_size=48),
    "other layer count": dict(arch="llama", num_hidden_layers=2),
}


@pytest.mark.parametrize("case", list(WRONG_BASE))
def test_loading_onto_another_base_model_is_refused(saved, case):
    overrides = dict(WRONG_BASE[case])
    model = tiny_model(overrides.pop("arch"), **overrides)
    with pytest.raises(SkipGPTError, match="trained for a llama model with hidden size 32 and 3 layers"):
        load_routers(model, saved)
    assert not has_routers(model)


def _write(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _truncate(name: str):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[: len((d / name).read_bytes()) // 2])


def _edit_config(**router):
    def edit(d: Path) -> None:
        data = json.loads((d / "router_config.json").read_text())
        data["router"].update(router)
        (d / "router_config.json").write_text(json.dumps(data))

    return edit


DAMAGE = {
    "config is not json": (_write("router_config.json", b"{not json"), "corrupt"),
    "config is binary garbage": (_write("router_config.json", b"\xff\xfe\x00\x01garbage"), "corrupt"),
    "config lacks the router entry": (_write("router_config.json", b'{"format": "skipgpt-routers"}'), "corrupt"),
    "config is a list": (_write("router_config.json", b"[1, 2]"), "corrupt"),
    "config missing": (lambda d: (d / "router_config.json").unlink(), "no router_config.json"),
    "weights are garbage": (_write("routers.safetensors", b"definitely not safetensors"), "corrupt"),
    "weights truncated": (_truncate("routers.safetensors"), "corrupt"),
    "weights missing": (lambda d: (d / "routers.safetensors").unlink(), "no routers.safetensors"),
    "weights of another router kind": (_edit_config(router="mlp"), "do not fit"),
    "unknown router kind": (_edit_config(router="conv"), "router must be"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_router_directory_raises_skipgpt_error(saved, case):
    damage, message = DAMAGE[case]
    damage(saved)
    model = tiny_model("llama")
    with pytest.raises(SkipGPTError, match=message):
        load_routers(model, saved)
    assert not has_routers(model)  # a failed load leaves the plain model


def test_loading_onto_an_unsupported_architecture_names_supported_types(saved):
    config = AutoConfig.for_model("gpt2", vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    with pytest.raises(SkipGPTError, match="supported model types: .*gemma2.*llama.*qwen3"):
        load_routers(AutoModelForCausalLM.from_config(config), saved)


def test_loading_onto_a_model_that_has_routers_raises(saved):
    model = attach_routers(tiny_model("llama"))
    with pytest.raises(SkipGPTError, match="already has routers"):
        load_routers(model, saved)


def test_save_overwrites_atomically_without_temp_files(tmp_path):
    model = trained_like("llama")
    save_routers(model, tmp_path)
    with torch.no_grad():
        router_parameters(model)[0].add_(1.0)
    save_routers(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router_config.json", "routers.safetensors"]
    fresh = load_routers(tiny_model("llama"), tmp_path)
    assert torch.equal(router_parameters(fresh)[0], router_parameters(model)[0])
