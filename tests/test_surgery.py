"""Attaching routers: what each gate mode computes, on every supported architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from skipgpt import (
    RouterConfig,
    SkipGPTError,
    attach_routers,
    detach_routers,
    gate_mode,
    has_routers,
    measure_sparsity,
    router_parameters,
    routing_state,
    set_gate_mode,
)
from skipgpt.routing.routers import Router, margin

IDS = random_ids(2, 12, seed=1)


def n_modules(model) -> int:
    return 2 * model.config.num_hidden_layers


@torch.no_grad()
def logits(model, ids=IDS, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, **kwargs).logits


# Ways of routing that must execute every module, hence reproduce the plain model bit for bit.
ALL_EXECUTE = {
    "dense": (RouterConfig(), lambda m: set_gate_mode(m, "dense")),
    "fixed-ones": (RouterConfig(), lambda m: set_gate_mode(m, "fixed", gates=torch.ones(n_modules(m)))),
    "fixed-ones-per-token": (
        RouterConfig(),
        lambda m: set_gate_mode(m, "fixed", gates=torch.ones(n_modules(m), *IDS.shape)),
    ),
    "argmax-threshold-below-every-margin": (RouterConfig(threshold=-1e9), lambda m: set_gate_mode(m, "argmax")),
}


@pytest.mark.parametrize("case", list(ALL_EXECUTE))
def test_all_execute_reproduces_unrouted_logits(arch, case):
    model = tiny_model(arch)
    reference = logits(model)
    config, set_mode = ALL_EXECUTE[case]
    attach_routers(model, config)
    set_mode(model)
    assert torch.equal(logits(model), reference)


def test_all_skip_leaves_final_norm_of_embeddings(arch):
    model = tiny_model(arch)
    attach_routers(model)
    set_gate_mode(model, "fixed", gates=torch.zeros(n_modules(model)))
    with torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True)
        embedded = out.hidden_states[0]  # embedding output, Gemma's sqrt(d) scaling included
        expected = model.model.norm(embedded)
        torch.testing.assert_close(out.hidden_states[-1], expected, rtol=0, atol=0)
        if getattr(model.config, "final_logit_softcapping", None) is None:
            torch.testing.assert_close(out.logits, model.lm_head(expected), rtol=0, atol=0)


def test_skipping_a_branch_equals_zeroing_its_output_projection(arch):
    """Module 2i is layer i's attention, 2i+1 its MLP: skipping one is the same model as one
    whose output projection is zero (the post-norm of a zero branch is zero too)."""
    model = tiny_model(arch)
    reference = tiny_model(arch)
    with torch.no_grad():
        reference.model.layers[1].self_attn.o_proj.weight.zero_()
        reference.model.layers[2].mlp.down_proj.weight.zero_()
    gates = torch.ones(n_modules(model))
    gates[2] = gates[5] = 0.0
    attach_routers(model)
    set_gate_mode(model, "fixed", gates=gates)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)


def test_attach_detach_leave_base_model_untouched(arch):
    model = tiny_model(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model)
    attach_routers(model, RouterConfig(init_bias=0.0))
    assert {k for k in model.state_dict() if "skip_routers" not in k} == weights.keys()
    set_gate_mode(model, "gumbel")
    model(input_ids=IDS).logits.sum().backward()  # a routed training step's forward and backward
    detach_routers(model)

    after = model.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert not has_routers(model)
    assert not any(hasattr(layer, "skip_routers") or "forward" in vars(layer) for layer in model.model.layers)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert torch.equal(logits(model), reference)


@pytest.mark.parametrize("replacement, tensors, per_module", [
    ("none", 2, 32 * 2 + 2),  # weight and bias of each linear router
    ("lowrank", 5, 32 * 2 + 2 + 32 + 2 * 32 * 16),  # + the replacement's vector and rank-16 map (the default)
])
def test_router_parameters_are_two_routers_per_layer(arch, replacement, tensors, per_module):
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(replacement=replacement))
    params = router_parameters(model)
    assert len(params) == tensors * n_modules(model)
    assert sum(p.numel() for p in params) == n_modules(model) * per_module
    assert routing_state(model).num_modules == n_modules(model)


# Parameters per routable module: the branch's linear layers plus every norm it owns
# (tiny config: hidden 32, 4 query heads and 2 kv heads of 8, MLP 64).
BRANCH_PARAMS = {
    "llama": (3104, 6176),  # attn: norm 32 + q 1024 + k 512 + v 512 + o 1024; mlp: norm 32 + 3*32*64
    "mistral": (3104, 6176),
    "qwen2": (3168, 6176),  # + q/k/v biases 32 + 16 + 16
    "qwen3": (3120, 6176),  # + q_norm, k_norm of head_dim 8
    "gemma2": (3136, 6208),  # + a post-norm per branch
    "gemma3_text": (3152, 6208),  # + post-norms and q_norm, k_norm
}


def test_module_params_count_each_branch_with_its_norms(arch):
    model = tiny_model(arch)
    attach_routers(model)
    attn, mlp = BRANCH_PARAMS[arch]
    assert routing_state(model).module_params.tolist() == [attn, mlp] * 3


def test_gumbel_gates_are_hard_in_forward(arch):
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(init_bias=0.0))
    set_gate_mode(model, "gumbel", tau=2.0)
    torch.manual_seed(0)
    model(input_ids=IDS)
    gates = routing_state(model).stacked_gates()
    assert gates.shape == (n_modules(model), *IDS.shape)
    assert set(gates.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("objective", ["logits", "sparsity"])
def test_gumbel_gradients_reach_every_router(arch, objective):
    """Straight-through: hard 0/1 gates forward, the soft sample's gradient backward."""
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(init_bias=0.0, replacement="none"))  # replacements: test_replacement.py
    model.requires_grad_(False)
    for p in router_parameters(model):
        p.requires_grad_(True)
    set_gate_mode(model, "gumbel", tau=1.0)
    torch.manual_seed(0)
    out = model(input_ids=IDS)
    loss = out.logits.sum() if objective == "logits" else routing_state(model).last_stats().params
    loss.backward()
    grads = [p.grad for p in router_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_argmax_is_deterministic_gumbel_is_not(arch):
    model = tiny_model(arch)
    attach_routers(model, RouterConfig(init_bias=0.0))
    state = routing_state(model)
    runs = {}
    for mode, seed in [("argmax", 1), ("argmax", 2), ("gumbel", 1), ("gumbel", 2)]:
        set_gate_mode(model, mode)
        torch.manual_seed(seed)
        out = logits(model)
        runs[mode, seed] = (out, state.stacked_gates().clone())
    assert torch.equal(runs["argmax", 1][0], runs["argmax", 2][0])
    assert torch.equal(runs["argmax", 1][1], runs["argmax", 2][1])
    assert not torch.equal(runs["gumbel", 1][1], runs["gumbel", 2][1])


@pytest.mark.parametrize("threshold", [0.0, 0.4, -0.4])
def test_argmax_executes_where_margin_exceeds_threshold(threshold):
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(init_bias=0.0, threshold=threshold))
    with torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True)
        router = model.model.layers[0].skip_routers["attn"]  # sees the embedding output
        expected = (margin(router(out.hidden_states[0])) > threshold).float()
    assert torch.equal(routing_state(model).stacked_gates()[0], expected)
    assert 0 < expected.mean() < 1  # a real mix of decisions, not a trivial case


def test_gate_mode_context_restores_previous_mode():
    model = tiny_model("llama")
    attach_routers(model)
    set_gate_mode(model, "gumbel", tau=3.0)
    with gate_mode(model, "fixed", gates=torch.zeros(6)) as state:
        assert state.mode == "fixed"
    state = routing_state(model)
    assert (state.mode, state.tau, state.fixed_gates) == ("gumbel", 3.0, None)


@pytest.mark.parametrize("input_norm", [True, False])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_router_options(kind, input_norm):
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(router=kind, input_norm=input_norm, init_bias=2.0, replacement="none"))
    router = model.model.layers[0].skip_routers["mlp"]
    shapes = [tuple(p.shape) for p in router.parameters()]
    assert shapes == ([(2, 32), (2,)] if kind == "linear" else [(8, 32), (8,), (2, 8), (2,)])
    last = router.net if kind == "linear" else router.net[-1]
    assert last.bias.tolist() == [0.0, 2.0]  # init_bias favours executing
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        scale_invariant = torch.allclose(router(x), router(7.0 * x), atol=1e-5)
    assert scale_invariant == input_norm  # the RMS input norm removes the residual stream's scale
    set_gate_mode(model, "gumbel")
    model(input_ids=IDS).logits.sum().backward()
    assert all(p.grad is not None for p in router_parameters(model))


@pytest.mark.parametrize("input_norm", [True, False])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fast_argmax_decision_equals_the_margin_rule_and_follows_weight_updates(kind, input_norm):
    router = Router(32, RouterConfig(router=kind, input_norm=input_norm, init_bias=0.0))
    x = 5.0 * torch.randn(4, 50, 32, generator=torch.Generator().manual_seed(0))
    for threshold in (-0.5, 0.0, 0.3, float("-inf")):
        with torch.no_grad():
            assert torch.equal(router.execute(x, threshold), margin(router(x)) > threshold)
    with torch.no_grad():
        before = router.execute(x, 0.0)
        for p in router.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))  # an optimizer step, in place
        assert torch.equal(router.execute(x, 0.0), margin(router(x)) > 0.0)
        assert not torch.equal(before, router.execute(x, 0.0))


def test_routers_compute_in_float32_for_a_bf16_model():
    model = tiny_model("llama").to(torch.bfloat16)
    attach_routers(model, RouterConfig(init_bias=0.0))
    assert all(p.dtype == torch.float32 for p in router_parameters(model))
    with torch.no_grad():
        out = model(input_ids=IDS)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert routing_state(model).stacked_gates().dtype == torch.float32



@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_router_margins_stay_float32_under_bf16_autocast(kind):
    """Training under autocast must take the decisions fp32 inference takes."""
    router = Router(64, RouterConfig(router=kind))
    x = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = router(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = router(x)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, fp32)

def tiny_gpt2():
    config = AutoConfig.for_model("gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return AutoModelForCausalLM.from_config(config)


def _attach_twice():
    model = tiny_model("llama")
    attach_routers(model)
    attach_routers(model)


def _fixed_without_gates():
    model = attach_routers(tiny_model("llama"))
    set_gate_mode(model, "fixed")


def _fixed_wrong_length():
    model = attach_routers(tiny_model("llama"))
    set_gate_mode(model, "fixed", gates=torch.ones(4))


def _unknown_mode():
    set_gate_mode(attach_routers(tiny_model("llama")), "softmax")


def _stats_before_forward():
    routing_state(attach_routers(tiny_model("llama"))).last_stats()


ERRORS = {
    "unknown architecture": (lambda: attach_routers(tiny_gpt2()), r"'gpt2' is not supported; supported model types: .*llama"),
    "attach twice": (_attach_twice, "already has routers"),
    "detach without routers": (lambda: detach_routers(tiny_model("llama")), "has no routers"),
    "state without routers": (lambda: routing_state(tiny_model("llama")), "has no routers"),
    "fixed without gates": (_fixed_without_gates, "first dimension of 6"),
    "fixed with wrong length": (_fixed_wrong_length, "first dimension of 6"),
    "unknown gate mode": (_unknown_mode, "gate mode must be one of"),
    "stats before a forward": (_stats_before_forward, "no routed forward pass"),
    "unknown router kind": (lambda: RouterConfig(router="conv"), "router must be 'linear' or 'mlp'"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_raise_skipgpt_error(case):
    action, message = ERRORS[case]
    with pytest.raises(SkipGPTError, match=message):
        action()


def test_unknown_architecture_leaves_model_unchanged():
    model = tiny_gpt2()
    with pytest.raises(SkipGPTError):
        attach_routers(model)
    assert not has_routers(model) and not any("skip_routers" in k for k in model.state_dict())


def test_router_module_is_float32_and_starts_executing():
    router = Router(32, RouterConfig(init_bias=3.0))
    logits_ = router(torch.zeros(4, 32, dtype=torch.bfloat16))
    assert logits_.dtype == torch.float32
    assert torch.equal(margin(logits_), torch.full((4,), 3.0))


# ---- generation with a KV cache ---------------------------------------------------------------


def generate(model, ids, mask, **kwargs):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, **kwargs
    )


def test_all_execute_generation_equals_plain_generation_and_counts_real_tokens(arch):
    model = tiny_model(arch)
    ids, mask = random_ids(2, 4), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    ids[0, :2] = 0
    reference = generate(model, ids, mask)
    attach_routers(model, RouterConfig(threshold=-1e9))
    with measure_sparsity(model) as meter:
        assert torch.equal(generate(model, ids, mask), reference)
    # prefill: 6 real prompt tokens; then 4 single-token decode steps for 2 sequences
    assert meter.summary()["tokens"] == 6 + 4 * 2


def test_cached_decoding_routes_like_a_full_forward(arch):
    """Each decode step sees only its new token; gates and logits must match a full forward."""
    model = attach_routers(tiny_model(arch), RouterConfig(init_bias=0.0))
    ids = random_ids(2, 4)
    out = generate(model, ids, torch.ones_like(ids), output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(input_ids=out.sequences).logits[:, 3:-1]
    assert 0 < routing_state(model).stacked_gates().mean() < 1
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)


def test_calling_the_inner_decoder_directly_sets_its_own_padding_mask(arch):
    """``model.model(...)`` (the decoder without its LM head) gets the routing state of its own
    call: the padding of its mask, not the last top-level call's."""
    from conftest import left_padded

    model = attach_routers(tiny_model(arch), RouterConfig(init_bias=0.0))
    for p in model.parameters():
        if p.dim() == 2 and p.shape[0] == 2:
            torch.nn.init.normal_(p, std=1.0)
    ids, mask = left_padded()
    state = routing_state(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(mask))  # no padding
        inner = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(state.token_mask, mask.bool())
        gates = state.stacked_gates()
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(state.stacked_gates(), gates)
    assert torch.allclose(inner[mask.bool()], full[mask.bool()], atol=1e-5)
