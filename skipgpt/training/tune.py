"""Stage 1, router tuning: the base model frozen, only routers learn.

Loss = LM loss + α·|T − r| with r the global sparsity of the hard Gumbel gates in the unit the
user chose (docs/method-choices.md, "Training (stage 1)"). The LM loss is next-token NLL (paper) or, with ``loss="kl"``, the KL
divergence to the frozen dense model's own next-token distribution, which gives every token a
full target for one extra no-grad forward.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..config import RouterConfig, TuneConfig
from ..devices import input_device
from ..errors import SkipGPTError
from ..files import write_json
from ..routing.save_load import load_routers_state_dict, routers_state_dict, save_routers
from ..routing.surgery import attach_routers, gate_mode, has_routers, router_parameters, routing_state, set_gate_mode
from . import checkpoint
from .calibrate import achieved_ratio, calibrate_threshold
from .importance import seed_routers_from_importance
from .loop import LoopSpec, run_loop, run_summary
from .losses import routed_loss
from .replacements import fit_replacements, fit_sequence_count

RESULTS_NAME = "results.json"


def schedule_progress(step: int, steps: int, begin: float = 0.0) -> float:
    """0 until the fraction ``begin`` of the run, then linearly to 1 at the last step: the clock of
    every schedule here (τ, the Gumbel noise scale, the delayed cosine learning rate)."""
    return min(max(step / max(steps - 1, 1) - begin, 0.0) / (1.0 - begin), 1.0)


def tau_at(step: int, steps: int, start: float, end: float, begin: float = 0.0) -> float:
    """Linear annealing over optimizer steps: ``start`` until the fraction ``begin`` of the run,
    then linearly to ``end`` at the last step (τ and the Gumbel noise scale both follow it)."""
    return start + (end - start) * schedule_progress(step, steps, begin)


def lr_factor(step: int, cfg: TuneConfig) -> float:
    """Multiplier of the learning rate after ``step`` optimizer steps."""
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = schedule_progress(step, cfg.steps, cfg.lr_decay_from)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Router parameters in two AdamW groups: the decision layers' weight matrices decay
    (``TuneConfig.weight_decay``), their biases and the replacements do not."""
    decayed = {id(p) for layer in routing_state(model).adapter.decoder_layers(model)
               for r in layer.skip_routers.values() for p in r.net.parameters() if p.ndim > 1}
    params = router_parameters(model)
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


# --budget-minutes' probe: micro-batches whose times must agree, their allowed max/min, and a cap.
PROBE_TIMED, PROBE_SPREAD, PROBE_MAX = 3, 1.15, 10
CALIBRATION_PASSES = 8  # one-pass first guess, bracketing and bisection take 5-8 passes


def _size_to_budget(model: torch.nn.Module, train_ids: torch.Tensor, calib_ids: torch.Tensor | None, cfg: TuneConfig,
                    out: Path, resume: bool, start: float) -> tuple[dict[str, Any], float | None]:
    """Set ``cfg.steps`` so that tuning and calibration fit ``cfg.budget_minutes`` here; return
    the sizing record and the time by which training must stop (``LoopSpec.stop_at``). The budget
    counts from ``start`` (before the replacement fit, which it includes).

    Times the real loss on micro-batches (no optimizer step, so the routers are untouched) until
    the last ``PROBE_TIMED`` agree within ``PROBE_SPREAD`` (at most ``PROBE_MAX``), then takes their
    median, and one calibration forward. On this project's CPU the first micro-batches after the
    replacement fit took 7.8 and 5.9 s under bf16 autocast, then 3.5-3.8 s (training steps 3.7-4.3
    s), and 14.9 and 7.6 s in fp32, then 5.8-6.1 s: one untimed micro-batch and the mean of the
    next two over-timed the step by 12-25 %, once by 60 % (an hour sized to 560 steps where 750
    fit). Waiting for a steady pace also keeps a burst on a shared CPU out of the estimate. The
    probe sizes the τ schedule; the stop time holds the budget when the machine slows down later.
    A resumed run keeps the step count it was started with, since the τ schedule and the data
    order depend on it, and finishes that schedule without a stop time.
    """
    saved = checkpoint.find(out) if resume else None
    if saved is not None:
        cfg.steps = checkpoint.load_trainer_state(saved)["fingerprint"]["tune"]["steps"]
        return {"budget_minutes": cfg.budget_minutes, "steps": cfg.steps, "resumed": True}, None
    batch = train_ids[: cfg.batch_size].to(input_device(model))
    autocast = torch.autocast(batch.device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    set_gate_mode(model, "gumbel", tau=cfg.tau_start, noise=cfg.noise_start)
    times: list[float] = []
    while len(times) < PROBE_MAX and not _steady(times[-PROBE_TIMED:]):
        tick = time.perf_counter()
        with autocast:
            loss, _ = routed_loss(model, batch, cfg)
        loss.backward()
        times.append(time.perf_counter() - tick)
    model.zero_grad(set_to_none=True)
    step_s = statistics.median(times[-PROBE_TIMED:]) * cfg.grad_accum
    calib_s = 0.0
    if calib_ids is not None and cfg.calibrate:
        tick = time.perf_counter()
        with torch.no_grad(), gate_mode(model, "argmax"):
            model(input_ids=calib_ids[:1].to(batch.device), use_cache=False)
        calib_s = (time.perf_counter() - tick) * calib_ids.shape[0] * CALIBRATION_PASSES
    left = cfg.budget_minutes * 60 - (time.perf_counter() - start) - calib_s
    steps = int(left // step_s)
    if steps < 1:
        raise SkipGPTError(
            f"a budget of {cfg.budget_minutes} min fits no training step here (one step takes {step_s:.1f} s, "
            f"calibration about {calib_s:.0f} s); give more minutes or set --steps"
        )
    cfg.steps = broadcast_object_list([steps])[0]  # every process trains the same schedule
    info = {"budget_minutes": cfg.budget_minutes, "steps": cfg.steps, "probe_step_s": round(step_s, 3),
            "probe_micro_batch_s": [round(t, 3) for t in times],
            "calibration_estimate_s": round(calib_s, 1), "resumed": False}
    return info, start + cfg.budget_minutes * 60 - calib_s


def _steady(times: list[float]) -> bool:
    return len(times) == PROBE_TIMED and max(times) <= PROBE_SPREAD * min(times)


def tune_routers(
    model: torch.nn.Module,
    train_ids: torch.Tensor,
    cfg: TuneConfig,
    out_dir: str | Path,
    *,
    router_config: RouterConfig | None = None,
    calib_ids: torch.Tensor | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train routers on ``train_ids`` [N, seq_len]; write routers, log and results to ``out_dir``.

    ``calib_ids`` (held-out training text) is used after training to calibrate the decision
    threshold so that argmax routing delivers the target (``cfg.calibrate``).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed + accelerator.process_index)  # Gumbel noise differs per process
    if not has_routers(model):
        attach_routers(model, router_config)
    # What the run settles before training; a resumed run restores the weights from its checkpoint
    # and this record from the checkpoint's trainer state.
    saved = checkpoint.find(out) if resume else None
    if saved is not None:
        record = checkpoint.load_trainer_state(saved).get("record", {})
    else:
        record = {"importance_seed": None, "replacement_fit": None}
        if routing_state(model).config.init == "importance":
            record["importance_seed"] = seed_routers_from_importance(
                model, calib_ids if calib_ids is not None else train_ids[:4], cfg.target, cfg.target_unit)
        record["replacement_fit"] = fit_replacements(model, train_ids[: fit_sequence_count(model, cfg.fit_sequences, train_ids.shape[1])]) or None
    model.requires_grad_(False)
    for p in router_parameters(model):
        p.requires_grad_(True)
    model.train()  # dropout is 0 in every supported config
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    ddp_model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = routing_state(model)
    state.checkpointing = cfg.gradient_checkpointing
    budget, stop_at = _size_to_budget(model, train_ids, calib_ids, cfg, out, resume, started) if cfg.budget_minutes else (None, None)
    fingerprint = {"tune": cfg.to_dict(), "router": {**state.config.to_dict(), "threshold": 0.0}, "data_shape": list(train_ids.shape)}

    def step_loss(m: torch.nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        tau = tau_at(step, cfg.steps, cfg.tau_start, cfg.tau_end)
        noise = tau_at(step, cfg.steps, cfg.noise_start, cfg.noise_end, cfg.noise_from)
        set_gate_mode(model, "gumbel", tau=tau, noise=noise)
        loss, parts = routed_loss(m, batch, cfg)
        return loss, {**parts, "tau": tau, "noise": noise}

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    last = run_loop(
        accelerator, ddp_model, optimizer, scheduler, train_ids,
        LoopSpec(cfg.steps, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.save_every, fingerprint, cfg.bf16, stop_at, record),
        step_loss, out, resume=resume,
        weights=lambda: routers_state_dict(model),
        load_weights=lambda w: load_routers_state_dict(model, w),
        desc="router tuning", progress=progress,
    )
    stopped_early = last.get("step", cfg.steps - 1) + 1 < cfg.steps
    if stopped_early:
        budget = {**budget, "stopped_at_step": last["step"] + 1}
        if accelerator.is_main_process:
            print(f"skipgpt: the {cfg.budget_minutes} min budget ran out after {last['step'] + 1} of {cfg.steps} steps "
                  f"(the machine ran slower than the probe); routers are saved and calibrated, and --resume finishes the schedule")
    model.eval()
    state.checkpointing = False
    set_gate_mode(model, "argmax")
    calibration: dict[str, Any] | None = None
    if accelerator.is_main_process and calib_ids is not None:
        if cfg.calibrate and state.config.routing == "skipgpt":
            calibration = calibrate_threshold(model, calib_ids, cfg.target, cfg.target_unit)
        else:
            ratio = achieved_ratio(model, calib_ids, cfg.target_unit)
            calibration = {"ratio_before": ratio, "ratio_after": ratio, "threshold": state.config.threshold}
    results = {
        "stage": "router-tuning",
        "tune": cfg.to_dict(),
        "router": state.config.to_dict(),
        **run_summary(accelerator, last, start),
        "calibration": calibration,
        **record,
        "budget": budget,
        **(meta or {}),
    }
    if accelerator.is_main_process:
        save_routers(model, out, extra={"training": cfg.to_dict(), **(meta or {})})
        write_json(out / RESULTS_NAME, results)
        if not stopped_early:
            checkpoint.remove(out)
    accelerator.wait_for_everyone()
    return results
