"""Width baselines (SliceGPT, LLM-Pruner): the requested ratio within granularity, weights really
removed, the model still runs and generates with a KV cache, and a saved plan rebuilds the same
model on a fresh base model."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

from skipgpt.baselines import get_method, load_pruned, save_pruned
from skipgpt.baselines.llm_pruner import _group_rows, llm_pruner_layers
from skipgpt.baselines.slicegpt import prune_slicegpt
from skipgpt.baselines.structure import decoder_parameter_count
from skipgpt.errors import SkipGPTError

# Wide enough that one granularity step is small: 4 KV heads of 2 query heads, 128 MLP channels.
GEOM = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128)


def state_numel(model: torch.nn.Module) -> int:
    return sum(v.numel() for v in model.state_dict().values())


@pytest.mark.parametrize("name", ["slicegpt", "llm-pruner"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_width_method_meets_ratio_shrinks_generates_and_round_trips(name, model_type, tmp_path):
    model = tiny_model(model_type, **GEOM)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = decoder_parameter_count(model)
    ids = random_ids(2, 24, seed=3)
    plan = get_method(name).prune(model, random_ids(4, 32, seed=1), 0.25)

    # Requested ratio within half a granularity step. The step is one hidden dimension (SliceGPT,
    # ~2% here) or one MLP channel in every pruned layer (LLM-Pruner, ~0.5%); it is bounded here
    # so that a plan reporting a huge step cannot pass.
    assert 0 < plan.extra["ratio_step"] < 0.03
    assert abs(plan.achieved_ratio - 0.25) <= plan.extra["ratio_step"] / 2 + 1e-9
    after = decoder_parameter_count(model)
    assert abs((1 - after / before) - plan.achieved_ratio) < 1e-12
    assert state_numel(model) < sum(v.numel() for v in base.values())  # really gone, not masked

    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 24, model.config.vocab_size) and torch.isfinite(logits).all()
    prompt = ids[:1, :5]
    cached = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)

    save_pruned(model, plan, tmp_path / name)
    fresh = tiny_model(model_type, **GEOM)
    load_pruned(fresh, tmp_path / name)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(fresh(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_slicegpt_slices_every_hidden_dimension_and_folds_the_norms():
    model = tiny_model("llama", **GEOM)
    plan = get_method("slicegpt").prune(model, random_ids(4, 32, seed=1), 0.25)
    d = plan.extra["sliced_dim"]
    assert d < GEOM["hidden_size"] and plan.extra["slicing"] == 1 - d / GEOM["hidden_size"]
    assert model.model.embed_tokens.weight.shape == (128, d) and model.lm_head.weight.shape == (128, d)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert [attn.q_proj.in_features, attn.k_proj.in_features, attn.v_proj.in_features] == [d] * 3
        assert attn.o_proj.weight.shape == (d, 64) and mlp.down_proj.weight.shape == (d, 128)
        assert mlp.gate_proj.in_features == mlp.up_proj.in_features == d
        assert layer.attn_shortcut_Q.shape == layer.mlp_shortcut_Q.shape == (d, d)
    assert not any("norm" in name for name, _ in model.named_parameters())  # folded into the linears
    assert sorted(plan.changed) == sorted(model.state_dict())


def test_slicegpt_without_slicing_the_head_keeps_the_last_output_full(tmp_path):
    """SliceGPT's own default (do_slice_head=False): the last layer writes the full width."""
    model = tiny_model("llama", tie_word_embeddings=True, **GEOM)
    ids = random_ids(2, 24, seed=3)
    plan = prune_slicegpt(model, random_ids(4, 32, seed=1), 0.25, slice_head=False)
    d = plan.extra["sliced_dim"]
    assert not plan.extra["slice_head"] and d < 64
    assert abs(plan.achieved_ratio - 0.25) <= plan.extra["ratio_step"] / 2 + 1e-9
    last = model.model.layers[-1]
    assert last.mlp_shortcut_Q.shape == (d, 64) and last.mlp.down_proj.weight.shape == (64, 128)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (d, 128)
    assert model.lm_head.weight.shape == (128, 64) and model.model.embed_tokens.weight.shape == (128, d)
    logits = model(input_ids=ids).logits
    save_pruned(model, plan, tmp_path / "nohead")
    fresh = tiny_model("llama", tie_word_embeddings=True, **GEOM)
    load_pruned(fresh, tmp_path / "nohead")
    torch.testing.assert_close(fresh(input_ids=ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_slicegpt_at_ratio_zero_only_rotates(model_type, tied, tmp_path):
    """Computational invariance: folding the norms and rotating every residual point into its
    PCA basis, with no dimension removed, leaves the function unchanged."""
    model = tiny_model(model_type, tie_word_embeddings=tied, **GEOM)
    ids = random_ids(2, 24, seed=3)
    dense = model(input_ids=ids).logits
    plan = get_method("slicegpt").prune(model, random_ids(4, 32, seed=1), 0.0)
    assert plan.extra["sliced_dim"] == GEOM["hidden_size"] and plan.extra["untied_embeddings"] == tied
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert plan.achieved_ratio < 0  # nothing sliced, two shortcut matrices per layer added
    rotated = model(input_ids=ids).logits
    torch.testing.assert_close(rotated, dense, rtol=0, atol=1e-4)
    # not the identity: the weights really were rotated
    assert not torch.allclose(model.model.layers[0].attn_shortcut_Q, torch.eye(GEOM["hidden_size"]))
    save_pruned(model, plan, tmp_path / "rot")
    fresh = tiny_model(model_type, tie_word_embeddings=tied, **GEOM)
    load_pruned(fresh, tmp_path / "rot")
    torch.testing.assert_close(fresh(input_ids=ids).logits, rotated, rtol=0, atol=0)


def test_llm_pruner_removes_whole_groups_and_keeps_the_rest_untouched():
    model = tiny_model("llama", num_hidden_layers=4, **GEOM)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    plan = get_method("llm-pruner").prune(model, random_ids(4, 32, seed=1), 0.25, layer_range=(1, 3))
    assert plan.changed == [] and plan.extra["layer_range"] == [1, 3] and set(plan.extra["kept"]) == {"1", "2"}
    head_dim, group = 8, 2
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"model.layers.{i}."
        if str(i) not in plan.extra["kept"]:  # outside the range: not a single weight changed
            assert all(torch.equal(v, base[k]) for k, v in layer.state_dict(prefix=prefix).items())
            continue
        keep = plan.extra["kept"][str(i)]
        heads, channels = keep["kv_heads"], torch.tensor(keep["channels"])
        assert len(heads) == 4 - plan.extra["kv_heads_pruned_per_layer"] < 4
        assert len(channels) == 128 - plan.extra["channels_pruned_per_layer"] < 128
        q_rows, kv_rows = _group_rows(heads, head_dim, group)
        assert attn.q_proj.weight.shape == (len(heads) * group * head_dim, 64)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (len(heads) * head_dim, 64)
        assert attn.o_proj.weight.shape == (64, len(heads) * group * head_dim)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (len(channels), 64)
        assert mlp.down_proj.weight.shape == (64, len(channels))
        # the remaining rows/columns are exactly the base model's: removal, no compensation
        assert torch.equal(attn.q_proj.weight, base[prefix + "self_attn.q_proj.weight"][q_rows])
        assert torch.equal(attn.v_proj.weight, base[prefix + "self_attn.v_proj.weight"][kv_rows])
        assert torch.equal(attn.o_proj.weight, base[prefix + "self_attn.o_proj.weight"][:, q_rows])
        assert torch.equal(mlp.down_proj.weight, base[prefix + "mlp.down_proj.weight"][:, channels])
        assert attn.num_key_value_groups == group


def test_llm_pruner_layer_range_scales_llama_7b_choice():
    assert llm_pruner_layers(32) == (4, 30)  # LLM-Pruner's own setting for LLaMA-7B
    assert llm_pruner_layers(30) == (4, 28)  # SmolLM2-135M
    assert llm_pruner_layers(40) == (5, 38)
    assert llm_pruner_layers(3) == (0, 3)


def test_llm_pruner_runs_on_gemma_and_slicegpt_refuses_it():
    model = tiny_model("gemma2", **GEOM)
    plan = get_method("llm-pruner").prune(model, random_ids(2, 32, seed=1), 0.25)
    assert abs(plan.achieved_ratio - 0.25) <= plan.extra["ratio_step"] / 2 + 1e-9
    prompt = random_ids(1, 5, seed=2)
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, use_cache=True),
                       model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, use_cache=False))
    with pytest.raises(SkipGPTError, match="Gemma"):
        get_method("slicegpt").prune(tiny_model("gemma2"), random_ids(2, 16), 0.25)


def test_width_methods_refuse_bad_requests():
    with pytest.raises(SkipGPTError, match="ratio"):
        get_method("slicegpt").prune(tiny_model("llama"), random_ids(2, 16), 1.0)
    model = tiny_model("llama")
    get_method("llm-pruner").prune(model, random_ids(2, 16), 0.0)
    with pytest.raises(SkipGPTError, match="already pruned"):
        get_method("slicegpt").prune(model, random_ids(2, 16), 0.25)
