"""The skipping inference path computes what the masked dense computation computes, and less of it."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, left_padded, logits_both_ways, tiny_model

from skipgpt import RouterConfig, attach_routers, routing_state
from skipgpt.routing.surgery import gate_mode


def routed(arch: str, attn: str = "eager", threshold: float = 0.0):
    """Random routers around a zero bias: a deterministic mix of executing and skipping tokens."""
    attn = "eager" if arch == "gemma2" else attn  # Gemma 2 has no SDPA path (logit soft-capping)
    model = attach_routers(tiny_model(arch, attn=attn), RouterConfig(init_bias=0.0, threshold=threshold))
    for p in model.parameters():
        if p.dim() == 2 and p.shape[0] == 2:
            torch.nn.init.normal_(p, std=1.0)
    return model


@pytest.mark.parametrize("path", ["gather", "dense"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefill_equals_masked_dense(arch, attn, padded, path):
    """Whichever path the cost model picks (routing/paths.py), forced here in turn."""
    model = routed(arch, attn)
    routing_state(model).engine_path = path
    ids, mask = left_padded()  # 24 tokens: longer than the sliding windows (16) of Mistral and Gemma
    mask = mask if padded else torch.ones_like(mask)
    skipped, masked = logits_both_ways(model, ids, mask)
    real = mask.bool()
    assert torch.allclose(skipped[real], masked[real], atol=1e-5, rtol=1e-4)
    gates = routing_state(model).stacked_gates()[:, real]
    assert 0.2 < float(gates.mean()) < 0.8  # the test exercises real skipping


@pytest.mark.parametrize("path", ["gather", "dense"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_gives_the_masked_dense_tokens(arch, path):
    model = routed(arch, "sdpa")
    routing_state(model).engine_path = path
    ids, mask = left_padded(length=12)
    state = routing_state(model)
    tokens = {}
    for skip in (True, False):
        state.skip_compute = skip
        tokens[skip] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                      pad_token_id=0)
    assert torch.equal(tokens[True], tokens[False])


@pytest.mark.parametrize("rows_attending", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_decode_step_with_rows_that_skip_attention_equals_masked(arch, rows_attending):
    """Batch 4, one new token per row: one row attending takes its keys out of the cache first,
    three attend with all four rows and drop the fourth row's query (execute._attending_rows).
    Either way the step's logits equal the masked computation's."""
    import copy

    from transformers import DynamicCache

    from skipgpt.routing.surgery import set_gate_mode

    model = routed(arch, "sdpa")
    state = routing_state(model)
    state.engine_path = "gather"  # the gathered path is the one that picks rows
    ids, mask = left_padded(batch=4, length=12, pad=2)
    cache = DynamicCache()
    with torch.no_grad(), gate_mode(model, "dense"):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    gates = torch.ones(state.num_modules, 4, 1)
    gates[0::2, rows_attending:] = 0.0  # attention: the first rows execute, the others skip
    gates[1::2, 0] = 0.0  # MLP: row 0 skips
    step = torch.randint(3, 128, (4, 1), generator=torch.Generator().manual_seed(5))
    step_mask = torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1)
    out = {}
    set_gate_mode(model, "fixed", gates=gates)
    for skip in (True, False):
        state.skip_compute = skip
        with torch.no_grad():
            out[skip] = model(input_ids=step, attention_mask=step_mask, past_key_values=copy.deepcopy(cache), use_cache=True).logits
    state.skip_compute = True
    assert torch.allclose(out[True], out[False], atol=1e-5, rtol=1e-4)


def test_skipped_tokens_do_not_run_the_module():
    model = routed("llama")
    routing_state(model).engine_path = "gather"
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


WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def fixed_routed(arch: str, dtype: torch.dtype, policy: str, device: str, seed: int = 0):
    """A seeded model wide enough that a token's output put in its neighbour's place shows, with
    random replacements and fixed random gates (about half of all tokens skip each module) for
    the batch of :func:`left_padded`. Fixed, not argmax: in half precision a router near its
    threshold may decide differently in the two computations, and a flipped decision moves the
    logits far more than rounding (59 eps·max|logit| measured for bf16 llama under ``drop``)."""
    from skipgpt import set_gate_mode

    attn = "eager" if arch == "gemma2" else "sdpa"
    model = attach_routers(tiny_model(arch, seed=seed, attn=attn, **WIDE), RouterConfig(init_bias=0.0, kv_policy=policy))
    for name, p in model.named_parameters():
        if ".replacement." in name:
            torch.nn.init.normal_(p, std=0.1)
    layers = model.config.num_hidden_layers
    gates = torch.rand(2 * layers, *left_padded()[0].shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    set_gate_mode(model, "fixed", gates=gates.float())
    return model.to(device, dtype)


@pytest.mark.parametrize("policy", ["keep", "drop"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", ["gather", "dense"])
def test_half_precision_skipping_equals_masked_to_rounding(arch, dtype, policy, device, path):
    """Logits of the skipping path and of the masked computation, both in the model's dtype,
    differ by at most 4 eps·max|logit|.

    Measured on the CPU over the six architectures and both KV policies: at most 1.2 (``keep``:
    0, the same sums); each computation is within 1.5 of the float32 computation of the same
    weights and gates, so two correct ones may differ by about 3. A wrong gather is far outside,
    checked by breaking the engine in a copy of the package and running this test there (bf16,
    fp16): MLP and attention outputs scattered one token over 108-171, 868-1366; attention outputs
    alone 104-171, 832-1359; the MLP's gathered inputs reversed 62-120, 494-958; replacements
    scattered one token over 103-201, 831-1612; ``keep``'s queries gathered in reverse order
    within each row 11.6-129, 100-1032 (``drop`` does not use that gather). Every case failed.
    """
    model = fixed_routed(arch, dtype, policy, device)
    routing_state(model).engine_path = path  # "drop" has no dense path: it gathers either way
    ids, mask = (t.to(device) for t in left_padded())
    skipped, masked = logits_both_ways(model, ids, mask)
    real = mask.bool()
    skipped, masked = skipped[real], masked[real]
    assert skipped.dtype == masked.dtype == dtype
    assert (skipped - masked).abs().max() <= 4 * torch.finfo(dtype).eps * masked.abs().max()


def drop_routed(arch: str, attn: str = "eager"):
    model = routed(arch, attn)
    routing_state(model).config.kv_policy = "drop"
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_drop_policy_skipping_equals_its_masked_training_computation(arch, attn):
    model = drop_routed(arch, attn)
    ids, mask = left_padded()
    skipped, masked = logits_both_ways(model, ids, mask)
    real = mask.bool()
    assert torch.allclose(skipped[real], masked[real], atol=1e-5, rtol=1e-4)
    keep = routed(arch, attn)
    with torch.no_grad():
        assert not torch.allclose(keep(input_ids=ids, attention_mask=mask).logits[real], masked[real], atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_drop_policy_decoding_with_its_cache_matches_the_full_sequence(arch):
    """What training computes over a whole sequence is what cached decoding computes token by token."""
    from skipgpt import DroppedKVCache

    model = drop_routed(arch, "sdpa")
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    state = routing_state(model)
    state.skip_compute = False
    with torch.no_grad():
        full = model(input_ids=ids).logits
        state.skip_compute = True
        cache = DroppedKVCache()
        steps = [model(input_ids=ids[:, :8], cache=cache, use_cache=True).logits]
        attn_executed = state.stacked_gates()[0::2].sum()
        for t in range(8, 20):
            steps.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
            attn_executed += state.stacked_gates()[0::2].sum()
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 20
    # Batch rows share slots: a step stores max over rows, so the cache holds at least the executed
    # keys and, for this mixed routing, clearly less than keep's 2 x 20 per layer.
    layers = model.config.num_hidden_layers
    assert int(attn_executed) <= cache.stored_tokens() < 2 * 20 * layers


def test_drop_policy_brings_its_own_cache_and_refuses_a_filled_plain_one():
    from transformers import DynamicCache

    from skipgpt import DroppedKVCache, SkipGPTError

    model = drop_routed("llama", "sdpa")
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        assert isinstance(model(input_ids=ids, cache=DynamicCache(), use_cache=True).cache, DroppedKVCache)
        routing_state(model).config.kv_policy = "keep"
        filled = model(input_ids=ids, cache=DynamicCache(), use_cache=True).cache
        routing_state(model).config.kv_policy = "drop"
        with pytest.raises(SkipGPTError, match="DroppedKVCache"):
            model(input_ids=ids[:, :1], cache=filled, use_cache=True)


def test_drop_policy_trains_with_gumbel_gates():
    from skipgpt import set_gate_mode
    from skipgpt.routing.surgery import router_parameters

    model = drop_routed("llama")
    set_gate_mode(model, "gumbel", tau=1.0)
    model(input_ids=torch.randint(3, 128, (2, 16))).logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in router_parameters(model))


def test_drop_policy_generation_equals_greedy_recomputation_without_cache():
    model = drop_routed("llama", "sdpa")
    ids, mask = left_padded(batch=2, length=10)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        seq, m = ids, mask
        routing_state(model).skip_compute = False  # the masked training computation, whole sequence each step
        for _ in range(8):
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=m, position_ids=positions, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(cached, seq)


def test_generate_api_refuses_empty_prompts_and_no_tokens():
    from skipgpt import GenerateConfig, SkipGPTError, generate

    with pytest.raises(SkipGPTError):
        generate(routed("llama"), None, [], GenerateConfig())
    with pytest.raises(SkipGPTError):
        generate(routed("llama"), None, ["hi"], GenerateConfig(max_new_tokens=0))


def test_generate_routes_by_argmax_whatever_gate_mode_the_model_was_left_in(tmp_path):
    """After ``set_gate_mode(model, "gumbel")`` (training) generation still takes the deployed
    decisions, deterministically; "masked" computes the same tokens, "dense" ignores the routers;
    the model's own mode and computation are given back."""
    from conftest import save_tiny_model_dir

    from skipgpt import GenerateConfig, SkipGPTError, generate, set_gate_mode
    from skipgpt.models import load_model

    _, tokenizer = load_model(str(save_tiny_model_dir(tmp_path / "model")))
    model = routed("llama", "sdpa")
    prompts, cfg = ["w1 w2 w3 w4", "w7"], GenerateConfig(max_new_tokens=12)
    argmax = generate(model, tokenizer, prompts, cfg)
    set_gate_mode(model, "gumbel", tau=1.0)
    after_training = [generate(model, tokenizer, prompts, cfg) for _ in range(2)]
    assert all(g.texts == argmax.texts and g.sparsity == argmax.sparsity for g in after_training)
    assert routing_state(model).mode == "gumbel" and routing_state(model).skip_compute
    assert generate(model, tokenizer, prompts, GenerateConfig(max_new_tokens=12, routing="masked")).texts == argmax.texts
    dense = generate(model, tokenizer, prompts, GenerateConfig(max_new_tokens=12, routing="dense"))
    assert dense.sparsity["module_sparsity"] == 0.0 < argmax.sparsity["module_sparsity"]
    with pytest.raises(SkipGPTError, match="routing must be one of"):
        GenerateConfig(routing="gumbel")
