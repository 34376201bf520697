"""Stage 1, router tuning: only routers learn, the target is met, runs resume exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Interrupt, assert_same_tensors, base_parameters, interrupt_tune_after, random_ids, router_tensors, tiny_model
from safetensors.torch import load_file

import skipgpt.training.tune
from skipgpt import (
    RouterConfig,
    SkipGPTError,
    TuneConfig,
    attach_routers,
    load_routers,
    router_parameters,
    routing_state,
    set_gate_mode,
)
from skipgpt.training.calibrate import achieved_ratio, calibrate_threshold
from skipgpt.next_token import final_hidden_states, kl_divergence
from skipgpt.training.losses import dense_outputs, routed_loss
from skipgpt.training.tune import tau_at, tune_routers

SMALL = dict(target=0.3, steps=4, batch_size=2, seq_len=16, lr=1e-2, save_every=100)


def run(out: Path, model=None, *, data_seed: int = 0, calib: bool = False, resume: bool = False,
        router_config: RouterConfig | None = None, **overrides):
    """tune_routers on a tiny llama (or ``model``) with random token data."""
    cfg = TuneConfig(**{**SMALL, **overrides})
    model = tiny_model("llama") if model is None else model
    ids = random_ids(32, cfg.seq_len, seed=data_seed)
    calib_ids = random_ids(2, 32, seed=data_seed + 1000) if calib else None
    results = tune_routers(
        model, ids, cfg, out, router_config=router_config, calib_ids=calib_ids, resume=resume, progress=False
    )
    return model, results


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ---- what training changes --------------------------------------------------------------------


def test_tuning_changes_only_routers(arch, tmp_path):
    model = attach_routers(tiny_model(arch))
    base, routers = base_parameters(model), router_tensors(model)
    run(tmp_path, model)
    assert_same_tensors(base_parameters(model), base)
    after = router_tensors(model)
    assert all(not torch.equal(after[k], routers[k]) for k in routers)  # every router learned
    assert all(p.grad is None for n, p in model.named_parameters() if "skip_routers" not in n)


def test_kl_training_never_changes_the_base_model(tmp_path):
    model = attach_routers(tiny_model("llama"))
    base, routers = base_parameters(model), router_tensors(model)
    _, results = run(tmp_path, model, loss="kl")
    assert_same_tensors(base_parameters(model), base)
    assert router_tensors(model).keys() == routers.keys()
    assert any(not torch.equal(v, routers[k]) for k, v in router_tensors(model).items())
    assert results["last_step"]["lm_loss"] >= 0.0  # a KL divergence


@pytest.mark.parametrize("seed", [0, 1])
def test_training_sparsity_reaches_target(tmp_path, seed):
    """From the executing init (~5 % skipped) to the 30 % parameter-ratio target in 60 steps."""
    _, results = run(
        tmp_path, tiny_model("llama", seed=seed), data_seed=seed, seed=seed, router_config=RouterConfig(init_bias=3.0),
        target=0.3, target_unit="params", lr=1e-2, steps=60, batch_size=16, grad_accum=2, seq_len=64,
    )
    log = read_log(tmp_path)
    assert log[0]["sparsity"] < 0.15  # it really had to move
    assert results["last_step"] == log[-1]
    assert abs(log[-1]["sparsity"] - 0.3) <= 0.03
    assert log[-1]["sparsity"] == pytest.approx(log[-1]["param_ratio"])


def test_module_unit_trains_module_sparsity(tmp_path):
    _, results = run(tmp_path, target_unit="modules", steps=3)
    last = results["last_step"]
    assert last["sparsity"] == pytest.approx(last["module_sparsity"])
    assert last["sparsity_loss"] == pytest.approx(8.0 * abs(0.3 - last["module_sparsity"]), rel=1e-5)


# ---- outputs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    model, results = run(out, calib=True, steps=6, grad_accum=2, save_every=2)
    return out, model, results


def test_finished_run_writes_routers_log_and_results(finished):
    out, _, results = finished
    assert sorted(p.name for p in out.iterdir()) == [
        "results.json", "router_config.json", "routers.safetensors", "train_log.jsonl",
    ]  # no checkpoint left behind once finished
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["tokens_trained"] == 6 * 2 * 2 * 16  # steps x grad_accum x batch x seq_len
    assert results["world_size"] == 1
    assert results["tune"] == TuneConfig(**{**SMALL, "steps": 6, "grad_accum": 2, "save_every": 2}).to_dict()
    assert set(results["calibration"]) >= {"threshold", "ratio_before", "ratio_after", "calibration_tokens"}
    assert results["calibration"]["calibration_tokens"] == 2 * 32


def test_router_config_records_training_recipe_and_calibrated_threshold(finished):
    out, model, results = finished
    saved = json.loads((out / "router_config.json").read_text())
    assert saved["training"] == json.loads(json.dumps(results["tune"]))
    assert saved["router"]["threshold"] == results["calibration"]["threshold"]
    assert saved["router"]["threshold"] == routing_state(model).config.threshold


def test_log_has_one_line_per_step_with_annealed_tau(finished):
    out, _, _ = finished
    log = read_log(out)
    assert [line["step"] for line in log] == list(range(6))
    assert [line["tau"] for line in log] == pytest.approx([tau_at(s, 6, 5.0, 1.0) for s in range(6)])
    assert [line["tokens"] for line in log] == [64 * (s + 1) for s in range(6)]
    assert all(line["loss"] == pytest.approx(line["lm_loss"] + line["sparsity_loss"], rel=1e-5) for line in log)


def test_finished_model_is_in_inference_state_and_reloads(finished):
    out, model, _ = finished
    state = routing_state(model)
    assert state.mode == "argmax" and not model.training
    ids = random_ids(2, 16, seed=9)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = load_routers(tiny_model("llama"), out)
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


# ---- threshold calibration --------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.15, 0.7])
@pytest.mark.parametrize("unit", ["params", "modules"])
def test_calibration_hits_the_requested_ratio(unit, target):
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0))
    calib = random_ids(4, 64, seed=5)
    before = achieved_ratio(model, calib, unit)
    result = calibrate_threshold(model, calib, target, unit)
    assert result["ratio_before"] == pytest.approx(before)
    assert abs(result["ratio_after"] - target) <= 0.01
    assert routing_state(model).config.threshold == result["threshold"]
    assert achieved_ratio(model, calib, unit) == pytest.approx(result["ratio_after"])
    assert (result["threshold"] > 0) == (target > before)  # more threshold, more skipping


def test_a_tighter_tolerance_searches_on_from_the_first_guess():
    """The tolerance is the bisection's stopping rule: a loose one accepts the one-pass first guess,
    a tight one bisects on and lands no farther from the target."""
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0))
    calib = random_ids(8, 128, seed=5)
    loose = calibrate_threshold(model, calib, 0.2, tol=0.05)
    tight = calibrate_threshold(model, calib, 0.2, tol=1e-4)
    assert loose["threshold"] == loose["threshold_first_guess"] and abs(loose["ratio_after"] - 0.2) > 1e-4
    assert tight["threshold"] != tight["threshold_first_guess"]
    assert abs(tight["ratio_after"] - 0.2) < abs(loose["ratio_after"] - 0.2)


def test_calibration_restores_the_gate_mode():
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0))
    set_gate_mode(model, "gumbel", tau=2.0)
    calibrate_threshold(model, random_ids(2, 32), 0.3)
    assert (routing_state(model).mode, routing_state(model).tau) == ("gumbel", 2.0)


# ---- losses -----------------------------------------------------------------------------------

EXECUTE_ALL = {
    "dense": lambda m: set_gate_mode(m, "dense"),
    "fixed ones": lambda m: set_gate_mode(m, "fixed", gates=torch.ones(6)),
}


@pytest.mark.parametrize("case", list(EXECUTE_ALL))
def test_kl_to_the_dense_model_is_zero_when_every_gate_executes(arch, case):
    model = attach_routers(tiny_model(arch))
    EXECUTE_ALL[case](model)
    batch = random_ids(2, 16)
    with torch.no_grad():
        student = final_hidden_states(model, batch)
        assert abs(float(kl_divergence(model, dense_outputs(model, batch)[0], student))) < 1e-6


def test_kl_to_the_dense_model_is_positive_when_modules_are_skipped():
    model = attach_routers(tiny_model("llama"))
    batch = random_ids(2, 16)
    kl = {}
    for skipped in (0, 1, 6):  # a random tiny model barely changes when one module is skipped
        set_gate_mode(model, "fixed", gates=torch.tensor([0.0] * skipped + [1.0] * (6 - skipped)))
        with torch.no_grad():
            kl[skipped] = float(kl_divergence(model, dense_outputs(model, batch)[0], final_hidden_states(model, batch)))
    assert kl[0] == 0.0 < kl[1] < kl[6]
    assert routing_state(model).mode == "fixed"  # the teacher pass does not change the mode


@pytest.mark.parametrize("loss", ["nll", "kl"])
def test_routed_loss_is_lm_loss_plus_alpha_times_gap(loss):
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0))
    set_gate_mode(model, "gumbel")
    torch.manual_seed(0)
    cfg = TuneConfig(target=0.6, alpha=2.0, loss=loss)
    total, parts = routed_loss(model, random_ids(2, 16), cfg)
    assert parts["sparsity_loss"] == pytest.approx(2.0 * abs(0.6 - parts["param_ratio"]), rel=1e-5)
    # Routers start near 50 % skip: the sparsity must be the student's, not the dense teacher's.
    assert 0.2 < parts["module_sparsity"] < 0.8
    assert float(total.detach()) == pytest.approx(parts["lm_loss"] + parts["sparsity_loss"], rel=1e-5)


# ---- resume -----------------------------------------------------------------------------------

RESUME = dict(steps=12, save_every=4, calib=True)


def interrupt_after(monkeypatch, calls: int, function: str = "routed_loss") -> None:
    interrupt_tune_after(monkeypatch, calls, function)


def test_interrupted_and_resumed_run_equals_straight_run(tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _, results_a = run(straight, **RESUME)

    interrupt_after(monkeypatch, 9)  # dies inside step 9; the last checkpoint is after step 8
    with pytest.raises(Interrupt):
        run(interrupted, **RESUME)
    monkeypatch.undo()
    assert [line["step"] for line in read_log(interrupted)] == list(range(9))
    assert not (interrupted / "results.json").exists()

    with pytest.raises(SkipGPTError, match="unfinished run"):
        run(interrupted, **RESUME)  # without resume=True
    with pytest.raises(SkipGPTError, match="different settings"):
        run(interrupted, resume=True, **{**RESUME, "alpha": 4.0})

    _, results_b = run(interrupted, resume=True, **RESUME)
    assert_same_tensors(
        load_file(str(interrupted / "routers.safetensors")), load_file(str(straight / "routers.safetensors"))
    )
    log_a, log_b = read_log(straight), read_log(interrupted)
    assert [line["step"] for line in log_b] == list(range(12))
    drop = lambda line: {k: v for k, v in line.items() if k != "elapsed_s"}  # noqa: E731
    assert [drop(line) for line in log_b] == [drop(line) for line in log_a]
    assert results_b["tokens_trained"] == results_a["tokens_trained"]
    assert results_b["calibration"] == results_a["calibration"]


def test_resume_without_checkpoint_starts_from_scratch(tmp_path):
    _, results = run(tmp_path, resume=True)
    assert [line["step"] for line in read_log(tmp_path)] == [0, 1, 2, 3]
    assert results["tokens_trained"] == 4 * 2 * 16


def test_rerun_into_finished_directory_starts_a_fresh_log(tmp_path):
    run(tmp_path)
    run(tmp_path)
    assert [line["step"] for line in read_log(tmp_path)] == [0, 1, 2, 3]


# ---- gradient checkpointing -------------------------------------------------------------------


def checkpointing_on(model) -> bool:
    hf = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    return hf or routing_state(model).checkpointing


def count_gate_decisions(model) -> list[int]:
    """Count router decisions: a checkpointed layer decides again when backward recomputes it."""
    state, calls = routing_state(model), [0]
    decide = state.decide

    def counting(*args, **kwargs):
        calls[0] += 1
        return decide(*args, **kwargs)

    state.decide = counting
    return calls


def router_grads(checkpointing: bool) -> list[torch.Tensor]:
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0, replacement="none"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train().requires_grad_(False)
    for p in router_parameters(model):
        p.requires_grad_(True)
    set_gate_mode(model, "gumbel", tau=2.0)
    calls = count_gate_decisions(model)
    torch.manual_seed(0)
    loss, _ = routed_loss(model, random_ids(2, 16), TuneConfig(target=0.3, loss="nll"))  # no teacher pass to count
    loss.backward()
    assert checkpointing_on(model) == checkpointing
    assert calls[0] == 6 * (2 if checkpointing else 1), "checkpointed layers must be recomputed in backward"
    return [p.grad for p in router_parameters(model)]


def test_gradient_checkpointing_gives_the_same_router_gradients():
    plain, checkpointed = router_grads(False), router_grads(True)
    assert all(g.abs().sum() > 0 for g in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))


def test_gradient_checkpointing_option_trains_the_same_routers(tmp_path):
    runs = {}
    for checkpointing in (False, True):
        # same router init for both runs; no replacement, whose fit would add dense passes to the count
        model = attach_routers(tiny_model("llama"), RouterConfig(replacement="none"))
        calls = count_gate_decisions(model)
        run(tmp_path / str(checkpointing), model, gradient_checkpointing=checkpointing, loss="nll")
        assert not checkpointing_on(model)  # switched off again after training
        runs[checkpointing] = (model, calls[0])
    assert runs[False][1] == 4 * 6  # 4 steps x 6 modules
    assert runs[True][1] == 4 * 6 * 2, "gradient_checkpointing=True must recompute layers in backward"
    for a, b in zip(router_parameters(runs[False][0]), router_parameters(runs[True][0])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- config -----------------------------------------------------------------------------------

BAD_CONFIGS = {
    "target 1": (dict(target=1.0), r"target sparsity must be in \[0, 1\)"),
    "negative target": (dict(target=-0.1), r"target sparsity must be in \[0, 1\)"),
    "unit": (dict(target_unit="layers"), "target unit must be"),
    "loss": (dict(loss="mse"), "loss must be"),
    "steps": (dict(steps=0), "steps must be at least 1"),
    "batch": (dict(batch_size=0), "batch_size must be at least 1"),
    "save_every": (dict(save_every=0), "save_every must be at least 1"),
    "noise_from": (dict(noise_from=1.0), r"noise_from is a fraction of the run in \[0, 1\)"),
    "lr_decay_from": (dict(lr_schedule="cosine", lr_decay_from=-0.1), r"lr_decay_from is a fraction of the run in \[0, 1\)"),
    "lr_decay_from constant": (dict(lr_decay_from=0.5), "use it with lr_schedule 'cosine'"),
    "sparsity_of": (dict(sparsity_of="soft"), "sparsity_of must be 'sampled' or 'argmax'"),
    "weight_decay": (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_invalid_tune_config_raises(case):
    kwargs, message = BAD_CONFIGS[case]
    with pytest.raises(SkipGPTError, match=message):
        TuneConfig(**kwargs)


def test_configs_round_trip_through_json():
    tune = TuneConfig(target=0.4, betas=(0.8, 0.9), loss="kl")
    assert TuneConfig.from_dict(json.loads(json.dumps(tune.to_dict()))) == tune  # betas: list -> tuple
    router = RouterConfig(router="mlp", threshold=0.5)
    assert RouterConfig.from_dict({**json.loads(json.dumps(router.to_dict())), "future_field": 1}) == router


def test_bf16_autocast_option_trains_float32_routers(tmp_path):
    model, results = run(tmp_path, bf16=True, steps=3)
    assert results["tune"]["bf16"] and math.isfinite(results["last_step"]["loss"])
    assert all(p.dtype == torch.float32 for p in router_parameters(model))


def test_weight_decay_shrinks_the_router_weight_matrices_only(tmp_path):
    """One AdamW step with and without decay from the same start: only the decision layers'
    weight matrices differ, by exactly lr x decay x their start (biases and replacements carry
    the execute prior and fitted outputs, which decay would pull to zero)."""
    def one_step(out: Path, weight_decay: float) -> tuple[dict, dict]:
        model = attach_routers(tiny_model("llama"), RouterConfig(replacement="lowrank", replacement_rank=2))
        torch.manual_seed(0)  # the fit and the Gumbel noise: the same in both runs
        before = router_tensors(model)
        run(out, model, steps=1, weight_decay=weight_decay)
        return before, router_tensors(model)

    start, plain = one_step(tmp_path / "plain", 0.0)
    _, decayed = one_step(tmp_path / "decayed", 0.5)
    matrices = {k for k in plain if ".net." in k and plain[k].ndim > 1}
    assert matrices and any(".replacement." in k for k in plain)
    for k in plain:
        if k in matrices:
            torch.testing.assert_close(decayed[k], plain[k] - SMALL["lr"] * 0.5 * start[k])
        else:
            assert torch.equal(decayed[k], plain[k]), k


# ---- budget -----------------------------------------------------------------------------------


def test_budget_sizes_the_steps_and_a_resume_keeps_them(tmp_path, monkeypatch):
    from skipgpt.training import checkpoint

    _, results = run(tmp_path / "a", budget_minutes=0.06, save_every=2, calib=True)
    budget = results["budget"]
    assert budget["steps"] >= 2 and not budget["resumed"] and budget["probe_step_s"] > 0
    # On a tiny model the optimizer step is a large share of a step, so the probe can be optimistic
    # and the stop time can end the run early (the next test covers that): count what was trained.
    trained = budget.get("stopped_at_step", budget["steps"])
    assert results["tune"]["steps"] == budget["steps"] and results["tokens_trained"] == trained * 2 * 16
    assert len(read_log(tmp_path / "a")) == trained

    interrupt_after(monkeypatch, 2 * 3, "tau_at")  # three training steps; the probe never calls tau_at
    with pytest.raises(Interrupt):
        run(tmp_path / "b", budget_minutes=0.06, save_every=2)
    monkeypatch.undo()
    planned = checkpoint.load_trainer_state(checkpoint.find(tmp_path / "b"))["fingerprint"]["tune"]["steps"]
    _, resumed = run(tmp_path / "b", budget_minutes=0.06, save_every=2, resume=True)
    assert resumed["budget"]["resumed"] and resumed["tune"]["steps"] == planned


@pytest.mark.parametrize("sleeps", [
    [0.6, 0.4, 0.3] + [0.2] * 7,  # a warm-up longer than one micro-batch (bf16 here: 7.8, 5.9, then 3.5-3.8 s)
    [0.2, 1.0] + [0.2] * 8,  # a burst on a shared CPU
], ids=["warm-up", "burst"])
def test_the_budget_probe_waits_for_a_steady_pace(tmp_path, monkeypatch, sleeps):
    """The probe must size the run on the pace training will keep: a slow start or one burst
    must not shrink the schedule (a fixed one-batch warm-up and the mean of two did, by a third)."""
    import time

    real, calls = skipgpt.training.tune.routed_loss, [0]

    def paced(*args, **kwargs):
        calls[0] += 1
        time.sleep(sleeps[calls[0] - 1] if calls[0] <= len(sleeps) else 0.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(skipgpt.training.tune, "PROBE_SPREAD", 1.3)  # room for a slow CI's jitter on 0.2 s
    monkeypatch.setattr(skipgpt.training.tune, "routed_loss", paced)
    _, results = run(tmp_path, budget_minutes=0.1, save_every=100)
    budget = results["budget"]
    assert 0.2 <= budget["probe_step_s"] < 0.3  # the old probe: 0.35 (warm-up), 0.6 (burst)
    assert len(budget["probe_micro_batch_s"]) >= 5


def test_a_budget_too_small_for_one_step_is_refused(tmp_path):
    with pytest.raises(SkipGPTError, match="fits no training step"):
        run(tmp_path, budget_minutes=1e-6)
    with pytest.raises(SkipGPTError, match="positive"):
        TuneConfig(budget_minutes=0)


def test_a_budget_run_stops_on_time_when_the_machine_slows_down(tmp_path, monkeypatch):
    """The probe sizes the schedule on a fast machine; steps then slow down (a shared CPU). The
    run must still end within one step of its budget, with calibrated routers and results
    written, and keep its checkpoint so that --resume finishes the planned schedule."""
    import time

    from skipgpt.training import checkpoint

    # A budget of a few seconds with room for the probe and calibration on a busy machine too.
    minutes, slow_s = 0.06, 0.15
    budget_s, step_s = minutes * 60, 2 * slow_s
    real_tau_at = skipgpt.training.tune.tau_at  # twice per micro-batch of training (τ, noise), never by the probe

    def slow_tau_at(*args, **kwargs):
        time.sleep(slow_s)
        return real_tau_at(*args, **kwargs)

    monkeypatch.setattr(skipgpt.training.tune, "tau_at", slow_tau_at)
    tick = time.perf_counter()
    model, results = run(tmp_path, budget_minutes=minutes, calib=True, save_every=100)
    took = time.perf_counter() - tick
    budget = results["budget"]
    done = budget["stopped_at_step"]
    assert 1 <= done < budget["steps"] and len(read_log(tmp_path)) == done
    assert took <= budget_s + step_s + 0.5  # one step late at most (+ calibration's slack)
    assert results["calibration"]["ratio_after"] is not None
    assert (tmp_path / "router_config.json").exists() and checkpoint.find(tmp_path) is not None
    monkeypatch.undo()
    _, resumed = run(tmp_path, budget_minutes=minutes, calib=True, save_every=100, resume=True)
    assert len(read_log(tmp_path)) == budget["steps"] and "stopped_at_step" not in resumed["budget"]
    assert checkpoint.find(tmp_path) is None
