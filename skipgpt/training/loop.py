"""The training loop shared by every stage: data order, accumulation, logging, checkpoints.

A stage supplies the trainable parameters, a loss function and a per-step hook; this module
makes the run data-parallel under ``accelerate launch``, resumable to the same result as an
uninterrupted run, and observable (progress bar with ETA, JSONL log).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..errors import SkipGPTError
from ..files import write_text
from ..pause import pause_point
from . import checkpoint

LOG_NAME = "train_log.jsonl"


def batch_indices(step: int, micro: int, *, n: int, batch_size: int, grad_accum: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Sequence indices of one process's micro-batch: a fixed function of the step, so a
    resumed run reads exactly what the uninterrupted run would have read."""
    global_batch = batch_size * world
    first = ((step * grad_accum + micro) * global_batch) + rank * batch_size
    positions = torch.arange(first, first + batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        sel = positions.div(n, rounding_mode="floor") == epoch
        out[sel] = order[positions[sel] % n]
    return out


@dataclass
class LoopSpec:
    steps: int
    batch_size: int
    grad_accum: int
    seed: int
    save_every: int
    fingerprint: dict[str, Any]  # everything that must match for a resume to be valid
    # bf16 autocast is ours rather than Accelerator(mixed_precision=...): accelerate's state is a
    # process-wide singleton, so a second run in one process could not change its precision.
    bf16: bool = False
    # perf_counter() time after which no step may start that would end past it (--budget-minutes):
    # the loop then saves a checkpoint and returns early, so --resume can finish the schedule.
    stop_at: float | None = None
    # What the stage settled before training (a replacement fit, an importance seed): kept in every
    # checkpoint, so that a resumed run reports it as the uninterrupted one would.
    record: dict[str, Any] = field(default_factory=dict)


StepLoss = Callable[[torch.nn.Module, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]


def run_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: torch.Tensor,
    spec: LoopSpec,
    step_loss: StepLoss,
    out_dir: Path,
    *,
    resume: bool,
    weights: Callable[[], dict[str, torch.Tensor]],
    load_weights: Callable[[dict[str, torch.Tensor]], None],
    desc: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Train for ``spec.steps`` optimizer steps; returns the last logged metrics.

    ``step_loss(model, batch, step)`` returns the loss of one micro-batch and metrics to log.
    With ``spec.stop_at`` the loop also stops, checkpointed, before a step that would end past it
    (judged by this session's mean step time), so a slowed machine cannot overrun a time budget.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    log_path = out_dir / LOG_NAME
    start_step, elapsed_before = 0, 0.0
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        checkpoint.discard_staging(out_dir)
    accelerator.wait_for_everyone()
    found = checkpoint.find(out_dir)
    if found is not None and not resume:
        raise SkipGPTError(f"{out_dir} holds an unfinished run; add --resume to continue it, or pick another --out")
    if found is not None:
        saved_world = checkpoint.load_trainer_state(found).get("world_size", 1)
        if saved_world != world:
            raise SkipGPTError(
                f"the checkpoint in {out_dir} was written by {saved_world} process(es), this run has {world}; resume "
                f"it with the same number (accelerate launch --num_processes {saved_world}): the data order depends on it"
            )
        saved = checkpoint.load(found, rank)
        if _without_learning_rates(saved["trainer_state"]["fingerprint"]) != _without_learning_rates(spec.fingerprint):
            raise SkipGPTError(
                f"the checkpoint in {out_dir} was made with different settings; resume with the same "
                "options (see its trainer_state.json; only the learning rate may change) or pick another --out"
            )
        wanted_lrs = list(_inner(scheduler).base_lrs)
        load_weights(saved["weights"])
        optimizer.load_state_dict(saved["optim"]["optimizer"])
        scheduler.load_state_dict(saved["optim"]["scheduler"])
        checkpoint.set_rng_state(saved["rng"])
        start_step = saved["trainer_state"]["step"]
        elapsed_before = saved["trainer_state"]["elapsed_s"]
        metrics = saved["trainer_state"].get("metrics", {})
        previous_lrs = _set_learning_rates(optimizer, scheduler, wanted_lrs)
        if accelerator.is_main_process:
            if previous_lrs is not None:
                print(f"skipgpt: resuming at step {start_step} with learning rate(s) {_lrs(wanted_lrs)} "
                      f"instead of {_lrs(previous_lrs)}", file=sys.stderr)
            if log_path.exists():  # drop log lines past the checkpoint: they will be produced again
                write_text(log_path, "".join(line + "\n" for line in _log_lines_before(log_path, start_step)))
    elif accelerator.is_main_process:
        log_path.unlink(missing_ok=True)
    last_saved = start_step

    def save(step: int, elapsed: float) -> None:
        nonlocal last_saved
        checkpoint.write_rank_state(out_dir, rank)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "elapsed_s": elapsed, "world_size": world, "fingerprint": spec.fingerprint,
                     "metrics": metrics, "record": spec.record}
            checkpoint.write_main_state(out_dir, weights(), optimizer, scheduler, state)
            checkpoint.commit(out_dir)
        accelerator.wait_for_everyone()
        last_saved = step

    n = data.shape[0]
    bar = tqdm(total=spec.steps, initial=start_step, desc=desc, disable=not (progress and accelerator.is_main_process), unit="step")
    t0 = time.perf_counter()
    for step in range(start_step, spec.steps):
        pause_point("step")
        sums: dict[str, float] = {}
        for micro in range(spec.grad_accum):
            idx = batch_indices(step, micro, n=n, batch_size=spec.batch_size, grad_accum=spec.grad_accum, rank=rank, world=world, seed=spec.seed)
            batch = data[idx].to(accelerator.device)
            sync = contextlib.nullcontext() if micro == spec.grad_accum - 1 else accelerator.no_sync(model)
            with sync, torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                loss, parts = step_loss(model, batch, step)
                accelerator.backward(loss / spec.grad_accum)
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v / spec.grad_accum
        reduced = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "mean")
        bad = [k for k, v in zip(sums, reduced.tolist()) if not math.isfinite(v)]
        if bad:  # before the optimizer step: the weights in memory stay those of the last good step
            kept = (f"the checkpoint of step {last_saved} is kept: continue with --resume and a lower --lr"
                    if last_saved else "no checkpoint was saved yet: start again with a lower --lr")
            raise SkipGPTError(f"non-finite {', '.join(bad)} at step {step}; {kept}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = elapsed_before + time.perf_counter() - t0
        metrics = {
            "step": step,
            **dict(zip(sums, reduced.tolist())),
            "lr": scheduler.get_last_lr()[0],
            "tokens": (step + 1) * spec.grad_accum * spec.batch_size * world * data.shape[1],
            "elapsed_s": round(elapsed, 2),
        }
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "sparsity", "tau") if k in metrics})
        bar.update(1)
        if (step + 1) % spec.save_every == 0 or step + 1 == spec.steps:
            save(step + 1, elapsed)
        if spec.stop_at is not None and step + 1 < spec.steps and _past_deadline(accelerator, spec.stop_at, t0, step + 1 - start_step):
            if (step + 1) % spec.save_every:
                save(step + 1, elapsed)
            break
    bar.close()
    return metrics


def _without_learning_rates(fingerprint: Any) -> Any:
    """A fingerprint less its learning rates: the one setting a resume may change, so that a run
    stopped by a non-finite loss can go on from its last checkpoint with a lower one."""
    if isinstance(fingerprint, dict):
        return {k: _without_learning_rates(v) for k, v in fingerprint.items() if k != "lr"}
    return json.loads(json.dumps(fingerprint))


def _inner(scheduler: Any) -> torch.optim.lr_scheduler.LambdaLR:
    return getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the scheduler


def _set_learning_rates(optimizer: Any, scheduler: Any, wanted: list[float]) -> list[float] | None:
    """Put this session's learning rates (``wanted``, from its options) into a resumed run; the
    schedule's position and the optimizer's moments stay the checkpoint's. Returns the
    checkpoint's rates if they differ."""
    inner = _inner(scheduler)
    saved = list(inner.base_lrs)
    if saved == wanted:
        return None
    for group, lr, factor in zip(optimizer.param_groups, wanted, inner.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(inner.last_epoch)
    inner.base_lrs = wanted
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    return saved


def _lrs(values: list[float]) -> str:
    """Each distinct rate once: parameter groups that differ only in weight decay share one."""
    return ", ".join(f"{v:g}" for v in dict.fromkeys(values))


def _log_lines_before(log_path: Path, step: int) -> list[str]:
    """The log lines of steps before ``step``; a last line cut short by a crash is dropped."""
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return kept


def _past_deadline(accelerator: Accelerator, stop_at: float, t0: float, steps_done: int) -> bool:
    """Whether one more step, at this session's mean pace, would end past ``stop_at``; every
    process gets the same answer so that none waits in a collective the others left."""
    now = time.perf_counter()
    late = now + (now - t0) / steps_done > stop_at
    return bool(accelerator.reduce(torch.tensor([float(late)], device=accelerator.device), "sum").item() > 0)


def run_summary(accelerator: Accelerator, last: dict[str, Any], start: float) -> dict[str, Any]:
    """What every training stage reports about its run in ``results.json``."""
    return {
        "tokens_trained": last.get("tokens", 0),
        "world_size": accelerator.num_processes,
        "wall_s": round(last.get("elapsed_s", 0.0), 1),
        "this_session_s": round(time.perf_counter() - start, 1),
        "last_step": last,
    }
