"""The skipping inference path computes what the masked dense computation computes, and less of it."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, tiny_model
from skipgpt import RouterConfig, attach_routers, routing_state
from skipgpt.surgery import gate_mode


def routed(arch: str, attn: str = "eager", threshold: float = 0.0):
    """Random routers around a zero bias: a deterministic mix of executing and skipping tokens."""
    attn = "eager" if arch == "gemma2" else attn  # Gemma 2 has no SDPA path (logit soft-capping)
    model = attach_routers(tiny_model(arch, attn=attn), RouterConfig(init_bias=0.0, threshold=threshold))
    for p in model.parameters():
        if p.dim() == 2 and p.shape[0] == 2:
            torch.nn.init.normal_(p, std=1.0)
    return model


def left_padded(batch: int = 3, length: int = 24, seed: int = 1):
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 5 * row] = 0  # left padding of 5 and 10 tokens
    return ids, mask


def logits_both_ways(model, ids, mask):
    state = routing_state(model)
    out = {}
    for skip in (True, False):
        state.skip_compute = skip
        with torch.no_grad():
            out[skip] = model(input_ids=ids, attention_mask=mask).logits
    state.skip_compute = True
    return out[True], out[False]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefill_equals_masked_dense_with_padding(arch, attn):
    model = routed(arch, attn)
    ids, mask = left_padded()
    skipped, masked = logits_both_ways(model, ids, mask)
    real = mask.bool()
    assert torch.allclose(skipped[real], masked[real], atol=1e-5, rtol=1e-4)
    gates = routing_state(model).stacked_gates()[:, real]
    assert 0.2 < float(gates.mean()) < 0.8  # the test exercises real skipping


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_gives_the_masked_dense_tokens(arch):
    model = routed(arch, "sdpa")
    ids, mask = left_padded(length=12)
    state = routing_state(model)
    tokens = {}
    for skip in (True, False):
        state.skip_compute = skip
        tokens[skip] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                      pad_token_id=0)
    assert torch.equal(tokens[True], tokens[False])


def test_skipped_tokens_do_not_run_the_module():
    model = routed("llama")
    seen = {"mlp": 0, "q": 0, "k": 0}
    layer = model.model.layers[1]
    layer.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", seen["mlp"] + a[0].shape[:-1].numel()))
    layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", seen["q"] + a[0].shape[:-1].numel()))
    layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k", seen["k"] + a[0].shape[:-1].numel()))
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
    gates = routing_state(model).stacked_gates()
    assert seen["mlp"] == int(gates[3].sum()) < 40
    assert seen["k"] == 40  # keep policy: every token writes its keys and values
    # queries run for the executing tokens, padded to the longest sequence of the batch
    assert seen["q"] == 2 * int(gates[2].sum(1).max())


def test_dense_gate_mode_takes_the_models_own_path():
    model = routed("llama")
    ids, mask = left_padded(batch=1)
    with torch.no_grad(), gate_mode(model, "dense"):
        routed_dense = model(input_ids=ids).logits
    from skipgpt import detach_routers

    with torch.no_grad():
        plain = detach_routers(model)(input_ids=ids).logits
    assert torch.equal(routed_dense, plain)


def test_bf16_skipping_matches_masked_within_bf16_precision():
    model = routed("llama", "sdpa").to(torch.bfloat16)
    ids, mask = left_padded()
    skipped, masked = logits_both_ways(model, ids, mask)
    real = mask.bool()
    assert torch.equal(skipped[real].argmax(-1), masked[real].argmax(-1)) or torch.allclose(
        skipped[real].float(), masked[real].float(), atol=0.1)
