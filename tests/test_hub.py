"""An exported directory loads routed through transformers' own ``trust_remote_code`` path (what
lm-eval's ``hf`` model, serving scripts and notebooks do), and dense without it."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import torch
from conftest import ARCHS, left_padded, save_tiny_model_dir
from transformers import AutoModelForCausalLM

from skipgpt import RouterConfig, attach_routers, measure_sparsity, routing_state, save_routers
from skipgpt.errors import SkipGPTError
from skipgpt.inference.export import CARD_NAME, export_model
from skipgpt.models import load_model
from skipgpt.routing.hub import MODELING_FILE
from skipgpt.routing.save_load import load_routers


def _randomise_routers(model: torch.nn.Module) -> None:
    """Decisions that differ per token and module, and replacements that are not zero."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "skip_routers" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "net" in name else 0.1))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple]:
    """For each architecture: (base dir, router dir, export dir), routers with rank-2 replacements."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(arch)
        base = save_tiny_model_dir(root / "base", arch)
        model, _ = load_model(str(base))
        attach_routers(model, RouterConfig(replacement="lowrank", replacement_rank=2, threshold=0.1))
        _randomise_routers(model)
        save_routers(model, root / "routers")
        out[arch] = (base, root / "routers", export_model(str(base), root / "exported", routers=str(root / "routers")))
    return out


def _run(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    with torch.no_grad(), measure_sparsity(model) as meter:
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits, routing_state(model).stacked_gates(), meter.summary()


# Gemma 2 has no SDPA attention in transformers (it refuses attn_implementation="sdpa").
@pytest.mark.parametrize(("arch", "attn"), [(a, i) for a in ARCHS for i in ("eager", "sdpa") if (a, i) != ("gemma2", "sdpa")])
def test_remote_code_load_equals_skipgpt_load(exports, arch, attn):
    base, routers, exported = exports[arch]
    ours, _ = load_model(str(base))
    load_routers(ours, routers)
    ours.set_attn_implementation(attn)
    remote = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, attn_implementation=attn).eval()
    assert type(remote).__name__.startswith("SkipGPT") and type(remote).__module__.endswith("modeling_skipgpt")
    ids, mask = left_padded()
    logits, gates, sparsity = _run(ours, ids, mask)
    remote_logits, remote_gates, remote_sparsity = _run(remote, ids, mask)
    assert torch.equal(gates, remote_gates), "per-module decisions differ"
    assert 0.05 < sparsity["module_sparsity"] < 0.95  # the routers really skip something
    assert remote_sparsity == sparsity
    real = mask.bool()
    torch.testing.assert_close(remote_logits[real], logits[real], rtol=0, atol=0)


def test_plain_load_is_dense_and_the_card_says_so_first(exports):
    base, _, exported = exports["llama"]
    dense = AutoModelForCausalLM.from_pretrained(base).eval()
    plain = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert not hasattr(plain, "skipgpt_state")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, dense(ids).logits, rtol=0, atol=0)
    first = (exported / CARD_NAME).read_text().splitlines()[0]
    assert "trust_remote_code=True" in first and "DENSE" in first
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_skipgpt.SkipGPTLlamaForCausalLM"
    assert config["skipgpt"]["router"]["replacement_rank"] == 2
    assert not (exported / "router_config.json").exists()  # the routers are in the model's own weights


def test_save_pretrained_round_trips_and_routers_stay_float32(exports, tmp_path):
    _, _, exported = exports["qwen3"]
    remote = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.bfloat16).eval()
    routers = {n: p for n, p in remote.named_parameters() if "skip_routers" in n}
    assert routers and {p.dtype for p in routers.values()} == {torch.float32}
    remote.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / MODELING_FILE).is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True, dtype=torch.bfloat16).eval()
    for name, p in again.named_parameters():
        assert torch.equal(p, dict(remote.named_parameters())[name]), name
    ids, mask = left_padded()
    first, second = _run(remote, ids, mask), _run(again, ids, mask)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    reloaded, _ = load_model(str(tmp_path / "again"), dtype=torch.bfloat16)  # skipgpt loads it routed, no remote code
    assert torch.equal(_run(reloaded, ids, mask)[1], first[1])


def test_generate_through_transformers_skips(exports):
    """``model.generate`` of the remote-code model is skipgpt's generation: same tokens, argmax routing."""
    from skipgpt.inference.generate import GenerateConfig, generate
    from skipgpt.models import load_tokenizer

    base, routers, exported = exports["llama"]
    remote = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    tokenizer = load_tokenizer(str(exported))
    ids = tokenizer(["w1 w2 w3 w4"], return_tensors="pt")
    with torch.no_grad(), measure_sparsity(remote) as meter:
        out = remote.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ours, _ = load_model(str(base))
    load_routers(ours, routers)
    result = generate(ours, tokenizer, ["w1 w2 w3 w4"], GenerateConfig(max_new_tokens=6))
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == result.texts[0]
    assert meter.summary()["module_sparsity"] > 0.05


def test_modeling_file_without_skipgpt_says_what_to_do(exports, monkeypatch):
    _, _, exported = exports["llama"]
    monkeypatch.setitem(sys.modules, "skipgpt.routing.hub", None)  # as if skipgpt were not installed
    with pytest.raises(ImportError, match="pip install skipgpt.*DENSE"):
        runpy.run_path(str(exported / MODELING_FILE))


def test_an_export_given_as_a_router_set_is_refused_with_advice(exports):
    base, _, exported = exports["llama"]
    model, _ = load_model(str(base))
    with pytest.raises(SkipGPTError, match=f"--model {exported}"):
        load_routers(model, exported)


def test_an_export_loads_routed_under_a_device_map_with_a_layer_on_disk(exports, tmp_path):
    base, routers, exported = exports["llama"]
    ours, _ = load_model(str(base))
    load_routers(ours, routers)
    layers = {f"model.layers.{i}": "disk" if i == 1 else "cpu" for i in range(3)}
    placement = {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped, _ = load_model(str(exported), device_map=placement, offload_folder=tmp_path / "offload")
    assert mapped.hf_device_map["model.layers.1"] == "disk"
    ids, mask = left_padded()
    (logits, gates, _), (mapped_logits, mapped_gates, _) = _run(ours, ids, mask), _run(mapped, ids, mask)
    assert torch.equal(gates, mapped_gates)
    torch.testing.assert_close(mapped_logits[mask.bool()], logits[mask.bool()], rtol=0, atol=0)
