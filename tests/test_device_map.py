"""Big-model loading: a routed model spread by accelerate's ``device_map``, with part of its layers
offloaded to disk, computes what the same model in one piece computes.

On a machine without GPUs every execution device is the CPU, but the offloaded layers still go
through accelerate's hooks (weights on ``meta`` between forwards, moved in for each call): what
breaks there (routers created on ``meta``, a routed forward patched over the hook's) breaks on
GPUs too.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import WORDS, left_padded, logits_both_ways, random_ids, save_tiny_model_dir

from skipgpt import RouterConfig, attach_routers, routing_state
from skipgpt.config import TuneConfig
from skipgpt.devices import is_dispatched, module_device
from skipgpt.evaluation.perplexity import perplexity
from skipgpt.inference.generate import GenerateConfig, generate
from skipgpt.models import load_model
from skipgpt.routing.save_load import load_routers_state_dict, routers_state_dict
from skipgpt.routing.surgery import detach_routers
from skipgpt.training.tune import tune_routers

LAYERS = 4
OFFLOADED = 1  # the layer that lives on disk


def placement() -> dict[str, str]:
    """Every module on the CPU except one layer, offloaded to disk."""
    layers = {f"model.layers.{i}": "disk" if i == OFFLOADED else "cpu" for i in range(LAYERS)}
    return {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def routed_pair(tmp_path, arch: str = "llama", **config):
    """The model loaded whole and loaded with a device map, with the same random routers (about
    half the tokens skip each module) and low-rank replacements."""
    save_tiny_model_dir(tmp_path / "model", arch, num_hidden_layers=LAYERS)
    plain, tokenizer = load_model(str(tmp_path / "model"))
    mapped, _ = load_model(str(tmp_path / "model"), device_map=placement(), offload_folder=tmp_path / "offload")
    cfg = RouterConfig(init_bias=0.0, **config)
    attach_routers(plain, cfg)
    torch.manual_seed(0)
    for name, p in plain.named_parameters():
        if "skip_routers" in name:
            torch.nn.init.normal_(p, std=1.0 if p.shape[0] == 2 else 0.05)
    attach_routers(mapped, cfg)
    load_routers_state_dict(mapped, routers_state_dict(plain))
    return plain, mapped, tokenizer


def test_the_map_offloads_a_layer_and_routers_sit_where_it_computes(tmp_path):
    _, mapped, _ = routed_pair(tmp_path)
    layer = mapped.model.layers[OFFLOADED]
    assert is_dispatched(mapped)
    assert layer.mlp.up_proj.weight.device.type == "meta"  # offloaded between forwards
    assert module_device(layer) == torch.device("cpu")
    assert all(p.device == torch.device("cpu") for p in layer.skip_routers.parameters())


@pytest.mark.parametrize("kv_policy", ["keep", "drop"])
def test_offloaded_model_gives_the_same_logits_and_decisions(tmp_path, kv_policy):
    plain, mapped, _ = routed_pair(tmp_path, kv_policy=kv_policy)
    ids, mask = left_padded()
    results = {}
    for name, model in (("plain", plain), ("mapped", mapped)):
        skipped, masked = logits_both_ways(model, ids, mask)
        results[name] = (skipped, masked, routing_state(model).stacked_gates())
    real = mask.bool()
    assert torch.equal(results["plain"][2], results["mapped"][2])  # the same decisions, token by token
    assert 0.2 < float(results["plain"][2][:, real].mean()) < 0.8
    assert torch.allclose(results["mapped"][0][real], results["plain"][0][real], atol=1e-5, rtol=1e-4)
    assert torch.allclose(results["mapped"][0][real], results["mapped"][1][real], atol=1e-5, rtol=1e-4)


def test_offloaded_model_gives_the_same_perplexity_generation_and_tuning(tmp_path):
    plain, mapped, tokenizer = routed_pair(tmp_path)
    text = " ".join(random.Random(0).choice(WORDS) for _ in range(400))
    ppl = {name: perplexity(m, tokenizer, text, seq_len=64, progress=False) for name, m in (("plain", plain), ("mapped", mapped))}
    assert ppl["mapped"]["ppl"] == pytest.approx(ppl["plain"]["ppl"], rel=1e-5)
    assert ppl["mapped"]["sparsity"]["module_sparsity"] == ppl["plain"]["sparsity"]["module_sparsity"]
    cfg = GenerateConfig(max_new_tokens=8)
    texts = {name: generate(m, tokenizer, ["w1 w2 w3", "w5"], cfg).texts for name, m in (("plain", plain), ("mapped", mapped))}
    assert texts["mapped"] == texts["plain"]

    ids = random_ids(8, 16, seed=3)
    tune = TuneConfig(steps=2, batch_size=2, seq_len=16, lr=1e-2, save_every=2, calibrate=False, fit_sequences=4)
    for name, m in (("plain", plain), ("mapped", mapped)):
        detach_routers(m)
        tune_routers(m, ids, tune, tmp_path / f"tune-{name}", router_config=RouterConfig(), progress=False)
    after = {name: routers_state_dict(m) for name, m in (("plain", plain), ("mapped", mapped))}
    for key, value in after["plain"].items():
        assert torch.allclose(after["mapped"][key], value, atol=1e-5, rtol=1e-4), key
