"""Replacements for skipped modules, and training the routing that inference deploys."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, left_padded, logits_both_ways, random_ids, tiny_model

from skipgpt import (
    RouterConfig,
    SkipGPTError,
    TuneConfig,
    attach_routers,
    load_routers,
    routing_state,
    save_routers,
    set_gate_mode,
)
from skipgpt.inference.cost import FlopCount, ModelShape, replacement_flops
from skipgpt.routing.routers import argmax_straight_through, execute_gate, margin, rms_normalised
from skipgpt.routing.save_load import BUILTIN_DIR
from skipgpt.routing.surgery import deployed_gates, gate_mode, observe_dense, router_parameters
from skipgpt.training import replacements
from skipgpt.training.calibrate import achieved_ratio
from skipgpt.training.losses import dense_outputs, lm_loss
from skipgpt.training.replacements import (
    Moments,
    Statistics,
    fit_batch_size,
    fit_replacements,
    fit_sequence_count,
    reduced_rank_fit,
)
from skipgpt.training.tune import lr_factor, tune_routers

LOWRANK = RouterConfig(replacement="lowrank", replacement_rank=4)


def replaced(arch: str, attn: str = "eager", config: RouterConfig = LOWRANK) -> torch.nn.Module:
    """Random routers around a zero bias (a mix of executing and skipping tokens) and random,
    non-zero replacements, so that a wrong token getting one shows in the logits."""
    attn = "eager" if arch == "gemma2" else attn
    model = attach_routers(tiny_model(arch, attn=attn), RouterConfig.from_dict({**config.to_dict(), "init_bias": 0.0}))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "skip_routers" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if "replacement" in name else 1.0))
    return model


# ---- the engine runs the replacement, never the skipped module ---------------------------------


@pytest.mark.parametrize("policy", ["keep", "drop"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bias", "lowrank"])
def test_skipping_with_replacements_equals_the_masked_computation(arch, attn, policy, kind):
    config = RouterConfig(replacement=kind, replacement_rank=4 if kind == "lowrank" else 0, kv_policy=policy)
    model = replaced(arch, attn, config)
    ids, mask = left_padded()
    skipped, masked = logits_both_ways(model, ids, mask)
    real = mask.bool()
    assert torch.allclose(skipped[real], masked[real], atol=1e-5, rtol=1e-4)
    assert 0.2 < float(routing_state(model).stacked_gates()[:, real].mean()) < 0.8
    # ... and the replacement matters: without it the same routing gives other logits.
    for layer in model.model.layers:
        for router in layer.skip_routers.values():
            router.replacement = None
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits[real], masked[real], atol=1e-3)


def test_a_skipping_token_runs_only_the_replacement():
    model = replaced("llama")
    routing_state(model).engine_path = "gather"  # the dense path (tests/test_paths.py) runs the module on every token
    layer = model.model.layers[1]
    seen = {"mlp": 0, "q": 0, "replacement": 0}

    def count(key):
        return lambda m, a, o: seen.__setitem__(key, seen[key] + a[0].shape[:-1].numel())

    layer.mlp.register_forward_hook(count("mlp"))
    layer.self_attn.q_proj.register_forward_hook(count("q"))
    layer.skip_routers["mlp"].replacement.register_forward_hook(count("replacement"))
    ids, mask = left_padded()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    executed = routing_state(model).stacked_gates()[3].bool() & mask.bool()
    real = int(mask.sum())
    assert seen["mlp"] == int(executed.sum()) < real
    assert seen["replacement"] == real - int(executed.sum())  # the skipping real tokens, no padding
    assert seen["q"] == 3 * int((routing_state(model).stacked_gates()[2].bool() & mask.bool()).sum(1).max())


def test_cached_generation_with_replacements_gives_the_masked_tokens():
    model = replaced("qwen3", "sdpa")
    ids, mask = left_padded(length=12)
    state = routing_state(model)
    tokens = {}
    for skip in (True, False):
        state.skip_compute = skip
        tokens[skip] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens[True], tokens[False])


# ---- replacements are paid for ----------------------------------------------------------------


def test_parameter_ratio_counts_what_a_skip_saves_net_of_its_replacement():
    model = attach_routers(tiny_model("llama"), LOWRANK)
    state = routing_state(model)
    d = model.config.hidden_size
    assert state.replacement_params.tolist() == [d + 2 * d * 4] * 6
    set_gate_mode(model, "fixed", gates=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]))  # layer 0's MLP skipped
    with torch.no_grad():
        model(input_ids=random_ids(2, 8))
    stats = state.last_stats()
    saved = state.module_params[1] - (d + 2 * d * 4)
    # less what the routers cost every token (tests/test_sparsity.py)
    assert float(stats.params) == pytest.approx(float(saved / state.module_params.sum()) - state.router_share)
    assert float(stats.module) == pytest.approx(1 / 6)
    plain = attach_routers(tiny_model("llama"), RouterConfig(replacement="none"))
    set_gate_mode(plain, "fixed", gates=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]))
    with torch.no_grad():
        plain(input_ids=random_ids(2, 8))
    assert float(routing_state(plain).last_stats().params) > float(stats.params)


def test_cost_model_counts_replacement_flops():
    shape = ModelShape.from_config(tiny_model("llama").config)
    context = torch.arange(1, 9).expand(2, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    gates = torch.ones(6, 2, 8)
    gates[1, :, :3] = 0  # six (token, module) pairs skipped
    plain, bias, lowrank = FlopCount(), FlopCount(), FlopCount()
    plain.add(shape, context, mask, gates, 2)
    bias.add(shape, context, mask, gates, 2, replacement=replacement_flops(32, "bias", 0))
    lowrank.add(shape, context, mask, gates, 2, replacement=replacement_flops(32, "lowrank", 4))
    assert bias.executed - plain.executed == 6 * 32
    assert lowrank.executed - plain.executed == 6 * (32 + 2 * 2 * 32 * 4)
    assert replacement_flops(32, "none", 0) == 0.0


# ---- fitting ----------------------------------------------------------------------------------


def module_outputs(model, ids) -> list[torch.Tensor]:
    state, outputs = routing_state(model), {}
    state.observers.append(lambda i, x, u: outputs.__setitem__(i, u.reshape(-1, u.shape[-1])))
    with torch.no_grad(), gate_mode(model, "dense"):
        model(input_ids=ids)
    state.observers.clear()
    return [outputs[i] for i in range(len(outputs))]


def test_bias_replacement_is_fitted_to_the_mean_module_output():
    model = attach_routers(tiny_model("llama"), RouterConfig(replacement="bias"))
    ids = random_ids(4, 16)
    fit_replacements(model, ids)
    means = [o.mean(0) for o in module_outputs(model, ids)]
    fitted = [r.replacement.bias for layer in model.model.layers for r in layer.skip_routers.values()]
    assert all(torch.allclose(f, m, atol=1e-5) for f, m in zip(fitted, means))


def test_lowrank_fit_explains_more_than_the_mean_and_more_with_rank():
    ids = random_ids(16, 32)
    explained = {}
    for kind, rank in (("bias", 0), ("lowrank", 2), ("lowrank", 8)):
        model = attach_routers(tiny_model("llama"), RouterConfig(replacement=kind, replacement_rank=rank))
        report = fit_replacements(model, ids)
        explained[rank] = report["explained_mlp"]
        assert report["fit_tokens"] == 16 * 32
    assert explained[0] == pytest.approx(0.0, abs=1e-6) or explained[0] < explained[2]
    assert explained[0] < explained[2] < explained[8] <= 1.0


def dense_pairs(model, ids) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every module's (x̂, y) over all tokens of one dense forward, in float64."""
    pairs = {}

    def keep(i, x, u):
        pairs[i] = (rms_normalised(x).reshape(-1, x.shape[-1]).double(), u.reshape(-1, u.shape[-1]).double())

    observe_dense(model, ids, keep, batch_size=len(ids))
    return pairs


def reference_fit(x: torch.Tensor, y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit before streaming, from the tokens themselves in float64: ridge regression, then the
    top-r eigenvectors of the fitted values' covariance by a full eigh. (bias, map [d, d])."""
    mx, my = x.mean(0), y.mean(0)
    cxx, cxy = (x - mx).t() @ (x - mx) / len(x), (x - mx).t() @ (y - my) / len(x)
    eye = torch.eye(len(mx), dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(cxx + replacements.RIDGE * cxx.diagonal().mean() * eye, cxy)
    v = torch.linalg.eigh(w.t() @ cxx @ w).eigenvectors[:, -rank:]
    projection = w @ v @ v.t()
    return my - mx @ projection, projection


def fitted_map(replacement) -> torch.Tensor:
    return (replacement.down.t() @ replacement.up.t()).detach()


def test_streamed_fit_equals_the_float64_least_squares_fit(arch, device):
    model = attach_routers(tiny_model(arch), LOWRANK).to(device)
    ids = random_ids(8, 32).to(device)
    fit_replacements(model, ids, batch_size=3)  # batches of unequal size
    pairs = dense_pairs(model, ids)
    routers = [r for layer in model.model.layers for r in layer.skip_routers.values()]
    for index, router in enumerate(routers):
        bias, projection = reference_fit(*pairs[index], rank=4)
        assert torch.allclose(router.replacement.bias.double(), bias, atol=1e-4 * float(bias.abs().max())), index
        assert torch.allclose(fitted_map(router.replacement).double(), projection, atol=1e-4 * float(projection.abs().max())), index


@pytest.mark.parametrize("config", [RouterConfig(replacement="bias"), LOWRANK], ids=["bias", "lowrank"])
def test_reported_r2_is_what_the_fitted_replacements_explain(config):
    model = attach_routers(tiny_model("gemma2"), config)
    ids = random_ids(6, 32)
    report = fit_replacements(model, ids)
    residual, power = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    routers = [r for layer in model.model.layers for r in layer.skip_routers.values()]

    def score(i, x, u):
        residual[i] += (u - routers[i].replacement(x)).double().pow(2).sum()
        power[i] += u.double().pow(2).sum()

    observe_dense(model, ids, score, batch_size=len(ids))
    explained = 1 - residual / power
    assert report["fit_tokens"] == 6 * 32
    assert report["explained_per_module"] == pytest.approx(explained.tolist(), abs=5e-5 + 1e-7)  # rounded to 4 places
    assert report["explained_attn"] == pytest.approx(float(explained[0::2].mean()), abs=1e-6)
    assert report["explained_mlp"] == pytest.approx(float(explained[1::2].mean()), abs=1e-6)


def fit_peak_bytes(layers: int, trace) -> int:
    """Peak of the CPU allocator's bytes during the fit, as the profiler's memory events count it
    (tracemalloc sees only Python's own allocations, not tensors)."""
    model = attach_routers(tiny_model("llama", hidden_size=256, num_hidden_layers=layers), LOWRANK)
    ids = random_ids(4, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fit_replacements(model, ids)
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    return max(e["Total Allocated"] for e in events if e["Device Type"] == 0)


def test_fit_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    """At d = 256 a module's float32 statistics (x̂ᵀx̂, x̂ᵀy) take 0.5 MB and dominate: holding
    every module's at once would make 8 layers cost 4× what 2 layers cost."""
    peak = {layers: fit_peak_bytes(layers, tmp_path / f"{layers}.json") for layers in (2, 8)}
    every_module = 2 * 8 * 2 * 256 * 256 * 4
    assert peak[8] < 1.25 * peak[2]
    assert peak[8] < every_module / 2


def test_reduced_rank_fit_recovers_an_exact_rank_r_map(monkeypatch):
    """y = b + x·A with rank(A) = 3, from moments summed over chunks: R² = 1 and the map is A."""
    monkeypatch.setattr(replacements, "RIDGE", 1e-12)  # the ridge's own shrinkage would be the only error
    g = torch.Generator().manual_seed(0)
    d, rank = 64, 3
    x = torch.randn(4096, d, generator=g) * torch.linspace(0.3, 3.0, d) + torch.randn(d, generator=g)
    a = torch.randn(d, rank, generator=g) @ torch.randn(rank, d, generator=g)
    b = torch.randn(d, generator=g)
    y = b + x @ a
    moments = Moments(x[:1000], y[:1000], None, second=True)
    for xs, ys in zip(x.split(1000), y.split(1000)):
        moments.add(xs, ys, None)
    fit = reduced_rank_fit(Statistics.of(moments), rank)
    assert float(fit.explained) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose((fit.a @ fit.v.t()).float(), a, atol=1e-4 * float(a.abs().max()))
    assert torch.allclose(fit.bias.float(), b, atol=1e-4 * float(b.abs().max()))
    assert torch.allclose(fit.v.t() @ fit.v, torch.eye(rank, dtype=fit.v.dtype), atol=1e-10)


def test_padding_tokens_do_not_enter_the_moments():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    weight = (torch.rand(300, generator=g) > 0.3).float()
    junk = torch.where(weight[:, None] > 0, 0.0, 1e3)  # what padding rows hold must not matter
    masked, real = Moments(x[:100] + junk[:100], y[:100], weight[:100], True), Moments(x[weight > 0][:70], y[weight > 0][:70], None, True)
    for chunk in range(0, 300, 100):
        part = slice(chunk, chunk + 100)
        masked.add(x[part] + junk[part], y[part], weight[part])
    real.add(x[weight > 0], y[weight > 0], None)
    a, b = Statistics.of(masked), Statistics.of(real)
    assert float(a.n) == float(b.n) == float(weight.sum())
    for name in ("mx", "my", "cyy", "power", "cxy", "regression"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name


def test_fit_tokens_grow_with_the_hidden_size():
    small = attach_routers(tiny_model("llama"), LOWRANK)
    wide = attach_routers(tiny_model("llama", hidden_size=4096, num_hidden_layers=1), LOWRANK)
    assert fit_sequence_count(small, None, 256) == 32  # 8192 tokens
    assert fit_sequence_count(small, None, 1024) == 8  # tokens count, not sequences
    assert fit_batch_size(256) == 4 and fit_batch_size(2048) == 1  # 1,024 tokens a forward, at least a sequence
    assert fit_sequence_count(wide, None, 256) == 64  # 4 · 4096 tokens
    assert fit_sequence_count(wide, 5, 256) == 5  # an explicit count is kept
    assert TuneConfig().fit_sequences is None
    with pytest.raises(SkipGPTError, match="fit_sequences must be at least 1"):
        TuneConfig(fit_sequences=0)
    for path in BUILTIN_DIR.glob("*/router_config.json"):  # the shipped sets fit on 32 sequences of 256 tokens:
        recorded = TuneConfig.from_dict(json.loads(path.read_text())["training"])  # recorded, or the default's 32 at d = 576
        assert recorded.seq_len == 256 and recorded.fit_sequences in (32, None)


def test_base_weights_stay_untouched_and_replacements_train(tmp_path):
    model = attach_routers(tiny_model("llama"), LOWRANK)
    base = {k: v.clone() for k, v in model.named_parameters() if "skip_routers" not in k}
    ids = random_ids(32, 16)
    fitted = attach_routers(tiny_model("llama"), LOWRANK)
    fit_replacements(fitted, ids)
    tune_routers(model, ids, TuneConfig(target=0.3, steps=3, batch_size=2, seq_len=16, save_every=100),
                 tmp_path, progress=False)
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in base.items())
    start = {k: v for k, v in fitted.named_parameters() if ".replacement." in k}
    after = {k: v for k, v in model.named_parameters() if ".replacement." in k}
    assert start and all(not torch.equal(after[k], v) for k, v in start.items())  # fitted, then trained
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["replacement_fit"]["fit_tokens"] == 32 * 16


def test_lora_targets_never_match_replacements():
    from skipgpt.training.finetune import FinetuneConfig, add_lora

    model = add_lora(attach_routers(tiny_model("llama"), LOWRANK), FinetuneConfig())
    wrapped = [n for n, _ in model.named_parameters() if "replacement" in n and "lora" in n]
    assert not wrapped


# ---- the saved set ----------------------------------------------------------------------------


def test_replacements_round_trip_and_old_sets_load_without_them(tmp_path):
    model = replaced("llama")
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_routers(model, tmp_path / "new")
    fresh = load_routers(tiny_model("llama"), tmp_path / "new")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)
    # A version-1 set (before replacements existed) keeps meaning "skip to nothing".
    plain = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0, replacement="none"))
    save_routers(plain, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "router_config.json").read_text())
    config["version"] = 1
    for key in ("replacement", "replacement_rank"):
        del config["router"][key]
    (tmp_path / "old" / "router_config.json").write_text(json.dumps(config))
    assert routing_state(load_routers(tiny_model("llama"), tmp_path / "old")).config.replacement == "none"


def test_lowrank_needs_a_rank_and_only_it_keeps_one():

    with pytest.raises(SkipGPTError, match="rank >= 1"):
        RouterConfig(replacement="lowrank", replacement_rank=0)
    assert RouterConfig(replacement="bias").replacement_rank == 0
    assert (RouterConfig().replacement, RouterConfig().replacement_rank) == ("lowrank", 16)  # the measured default


# ---- training what is deployed ----------------------------------------------------------------


def test_noise_one_is_the_papers_gumbel_sampler_and_zero_is_argmax():
    logits = torch.randn(4, 7, 2, requires_grad=True)
    torch.manual_seed(3)
    paper = F.gumbel_softmax(logits, tau=2.0, hard=True)[..., 1]
    torch.manual_seed(3)
    assert torch.equal(execute_gate(logits, "gumbel", 2.0, 0.0, noise=1.0), paper)
    deterministic = execute_gate(logits, "gumbel", 2.0, 0.0, noise=0.0)
    assert torch.equal(deterministic.detach(), execute_gate(logits, "argmax", 1.0, 0.0))
    deterministic.sum().backward()  # straight-through: the tempered softmax's gradient
    soft = (logits.detach() / 2.0).softmax(-1)
    assert torch.allclose(logits.grad[..., 1], soft[..., 0] * soft[..., 1] / 2.0, atol=1e-6)


def test_argmax_straight_through_decides_as_inference_with_a_sigmoid_gradient():
    logits = torch.randn(4, 7, 2, requires_grad=True)
    gate = argmax_straight_through(logits, tau=2.0, threshold=0.3)
    assert torch.equal(gate.detach(), execute_gate(logits, "argmax", 1.0, 0.3))
    gate.sum().backward()
    s = torch.sigmoid((margin(logits.detach()) - 0.3) / 2.0)
    assert torch.allclose(logits.grad[..., 1], s * (1 - s) / 2.0, atol=1e-6)
    assert torch.allclose(logits.grad[..., 0], -logits.grad[..., 1])


def test_deployed_gates_are_the_argmax_forwards_decisions_with_router_gradients():
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0))
    batch = random_ids(2, 16)
    with torch.no_grad(), gate_mode(model, "argmax"):
        model(input_ids=batch)
        inference = routing_state(model).stacked_gates()
    with gate_mode(model, "gumbel", tau=2.0):
        gates = deployed_gates(model, batch)
    assert torch.equal(gates.detach(), inference) and routing_state(model).observers == []
    gates.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for n, g in grads.items() if ".net." in n)  # the decision weights
    assert all(g is None for n, g in grads.items() if "skip_routers" not in n)  # the base model's inputs were recorded


# The two levers that aim argmax at the target are tested without the default router weight
# decay: at this tiny set-up's lr 1e-2 it shrinks the weights 1 % a step, pulling the margins back
# to the execute bias, and argmax then fell short of 0.3 in two of the five cases (0.17 with the
# noise annealed from half-way, 0.22 counting argmax's decisions; 0.29 with the noise annealed
# throughout). The real model at 111 steps skipped 12.3 % before calibration with the decay,
# 16.9 % without (docs/small-budget.md).
NO_DECAY = 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_counting_the_argmax_decisions_brings_the_deployed_ratio_to_the_target(tmp_path, seed):
    """The paper's noisy sampler throughout; only what the sparsity term counts changes. Counting
    the samples, argmax skips a third to a half of the target (the real model's 13.5 % for 25 %;
    0.10 and 0.17 of the skips for 0.3 here, seeds 0 and 1); counting argmax's own decisions lands
    near it (0.25 and 0.28: the margins start far on the executing side, so the last of the
    approach is slow)."""
    ids = random_ids(64, 64, seed=seed)
    deployed = {}
    for counted in ("sampled", "argmax"):
        cfg = TuneConfig(target=0.3, steps=60, batch_size=16, seq_len=64, lr=1e-2, save_every=1000, sparsity_of=counted,
                         lr_schedule="cosine", seed=seed, calibrate=False, weight_decay=NO_DECAY,
                         fit_sequences=32)  # as measured; the default fits all 64 here, and seed 0 then lands at 0.243
        model = tiny_model("llama", seed=seed)
        results = tune_routers(model, ids, cfg, tmp_path / counted, router_config=RouterConfig(), progress=False)
        assert routing_state(model).config.threshold == 0.0  # not calibrated
        # The skipped share, before the routers' own cost: the mechanism under test is what the
        # sparsity term counts; the routers' fixed 1.4 % of this 32-wide model (0.07 % of
        # SmolLM2's) is an offset these 60 steps do not make up.
        deployed[counted] = achieved_ratio(model, ids, "params", batch_size=16) + routing_state(model).router_share
    assert deployed["sampled"] < 0.6 * 0.3 and deployed["argmax"] - deployed["sampled"] >= 0.1
    assert abs(deployed["argmax"] - 0.3) <= 0.055
    assert "sampled_sparsity" in results["last_step"]


@pytest.mark.parametrize("seed,noise_from", [(0, 0.0), (1, 0.0), (0, 0.5)])
def test_argmax_hits_the_target_without_calibration_when_noise_anneals_to_zero(tmp_path, seed, noise_from):
    cfg = TuneConfig(target=0.3, steps=60, batch_size=16, seq_len=64, lr=1e-2, save_every=1000, noise_end=0.0,
                     noise_from=noise_from, lr_schedule="cosine", seed=seed, calibrate=False, weight_decay=NO_DECAY,
                     fit_sequences=32)  # as measured; fitted on all 64, seed 0 annealing from half-way lands at 0.274
    model = tiny_model("llama", seed=seed)
    ids = random_ids(64, 64, seed=seed)
    tune_routers(model, ids, cfg, tmp_path, router_config=RouterConfig(), progress=False)
    assert routing_state(model).config.threshold == 0.0  # not calibrated
    skipped = achieved_ratio(model, ids, "params", batch_size=16) + routing_state(model).router_share  # as above
    assert abs(skipped - 0.3) <= 0.02


def test_cosine_schedule_decays_to_its_floor():
    cfg = TuneConfig(steps=11, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(1.0)
    assert lr_factor(5, cfg) == pytest.approx(0.55)
    assert lr_factor(10, cfg) == pytest.approx(0.1)
    assert lr_factor(7, TuneConfig(steps=11)) == 1.0


def test_a_delayed_cosine_holds_the_full_rate_then_decays_over_the_rest():
    cfg = TuneConfig(steps=11, lr_schedule="cosine", min_lr_ratio=0.1, lr_decay_from=0.6)
    assert [lr_factor(s, cfg) for s in (0, 3, 6)] == [1.0, 1.0, 1.0]
    assert lr_factor(8, cfg) == pytest.approx(0.55)
    assert lr_factor(10, cfg) == pytest.approx(0.1)


def test_hidden_distillation_is_zero_for_the_dense_model_and_grows_with_skipping():
    model = attach_routers(tiny_model("llama"))
    batch = random_ids(2, 16)
    losses = {}
    for skipped in (0, 3):
        set_gate_mode(model, "fixed", gates=torch.tensor([0.0] * skipped + [1.0] * (6 - skipped)))
        with torch.no_grad():
            total, parts = lm_loss(model, batch, "kl", dense_outputs, hidden_weight=2.0)
        losses[skipped] = parts["hidden_loss"]
        assert float(total) == pytest.approx(float(parts["lm_loss"] + 2.0 * parts["hidden_loss"]), rel=1e-5)
    assert float(losses[0]) == pytest.approx(0.0, abs=1e-10) and float(losses[3]) > 0


def test_hidden_distillation_gives_router_and_replacement_gradients():
    model = attach_routers(tiny_model("llama"), LOWRANK)
    model.requires_grad_(False)
    for p in router_parameters(model):
        p.requires_grad_(True)
    set_gate_mode(model, "gumbel", tau=1.0, noise=0.0)
    total, _ = lm_loss(model, random_ids(2, 16), "kl", dense_outputs, hidden_weight=1.0)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in router_parameters(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_replacements_train_on_every_architecture(arch, tmp_path):
    model = attach_routers(tiny_model(arch), RouterConfig(replacement="bias"))
    tune_routers(model, random_ids(16, 16), TuneConfig(target=0.3, steps=2, batch_size=2, seq_len=16, save_every=100,
                                                       noise_end=0.0, hidden_distill=0.5), tmp_path, progress=False)
    assert (tmp_path / "routers.safetensors").is_file()


def test_gradient_checkpointing_gives_the_same_replacement_gradients():
    grads = []
    for checkpointing in (False, True):
        model = attach_routers(tiny_model("llama"), LOWRANK)
        fit_replacements(model, random_ids(4, 16))
        model.train().requires_grad_(False)
        for p in router_parameters(model):
            p.requires_grad_(True)
        routing_state(model).checkpointing = checkpointing
        set_gate_mode(model, "gumbel", tau=2.0)
        torch.manual_seed(0)
        model(input_ids=random_ids(2, 16), use_cache=False).logits.sum().backward()  # as training runs
        grads.append({n: p.grad for n, p in model.named_parameters() if ".replacement." in n})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
