"""Setting the decision threshold so that argmax routing delivers the ratio asked for.

Training matches the target with Gumbel *samples*; argmax decisions on the same routers skip
a different amount (docs/method-choices.md, "Inference decision and threshold calibration"). A single
global shift of the execute-minus-skip margin fixes that without touching router weights.
Downstream routers see the hidden states that upstream decisions produce, so the shift is
found by bisection on full forward passes, on calibration text only (never evaluation text).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from ..devices import input_device
from ..pause import pause_point
from ..routing.save_load import read_router_config, save_routers
from ..routing.surgery import gate_mode, measure_sparsity, routing_state


@torch.no_grad()
def achieved_ratio(model: torch.nn.Module, sequences: torch.Tensor, unit: str, batch_size: int = 1) -> float:
    device = input_device(model)
    key = "param_ratio" if unit == "params" else "module_sparsity"
    with gate_mode(model, "argmax"), measure_sparsity(model) as meter:
        for batch in sequences.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    return float(meter.summary()[key])


# Stop bisecting once the calibration text's ratio is this close to the target: finer than the
# ratio carries over to other text, so the default; `calibrate --tolerance` tightens it.
TOLERANCE = 0.003


@torch.no_grad()
def _first_guess(model: torch.nn.Module, sequences: torch.Tensor, target: float, unit: str, batch_size: int) -> tuple[float, float]:
    """(ratio at the current threshold, threshold that would hit the target if decisions
    were independent): one pass recording every margin, then a weighted quantile."""
    state = routing_state(model)
    state.margin_log = [[] for _ in range(state.num_modules)]
    try:
        ratio = achieved_ratio(model, sequences, unit, batch_size)
        margins = [torch.cat(m) for m in state.margin_log]
    finally:
        state.margin_log = None
    weights, total = (state.saved_params, state.module_params.sum()) if unit == "params" else (torch.ones(state.num_modules, dtype=torch.float64), state.num_modules)
    if unit == "params":
        target += state.router_share  # what skips must save for the routers' own cost to leave ``target``
    values = torch.cat(margins).double()
    mass = torch.cat([torch.full((len(m),), float(w) / len(m)) for m, w in zip(margins, weights)]).double()
    order = values.argsort()
    cumulative = mass[order].cumsum(0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor(target, dtype=torch.float64)).clamp(max=len(values) - 1))
    return ratio, float(values[order][k])


@torch.no_grad()
def calibrate_threshold(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    target: float,
    unit: str = "params",
    *,
    tol: float = TOLERANCE,
    max_iters: int = 12,
    batch_size: int = 1,
) -> dict[str, float]:
    """Find the threshold whose argmax routing skips ``target`` of ``sequences``; sets it on
    the model's router config and returns the ratio before and after."""
    state = routing_state(model)
    before_threshold = state.config.threshold
    before, guess = _first_guess(model, sequences, target, unit, batch_size)
    state.config.threshold = guess
    ratio = achieved_ratio(model, sequences, unit, batch_size)
    pause_point("calibration")
    best = (abs(ratio - target), guess, ratio)
    # More threshold -> more skipping. Bracket the target by doubling steps, then bisect.
    lo = hi = guess
    step, direction = 0.125, 1.0 if ratio < target else -1.0
    while best[0] > tol and (ratio < target if direction > 0 else ratio > target) and step < 256:
        lo, hi = (hi, hi + step) if direction > 0 else (lo - step, lo)
        state.config.threshold = hi if direction > 0 else lo
        ratio = achieved_ratio(model, sequences, unit, batch_size)
        best = min(best, (abs(ratio - target), state.config.threshold, ratio))
        step *= 2
    for _ in range(max_iters):
        if best[0] <= tol:
            break
        mid = (lo + hi) / 2
        state.config.threshold = mid
        ratio = achieved_ratio(model, sequences, unit, batch_size)
        best = min(best, (abs(ratio - target), mid, ratio))
        lo, hi = (mid, hi) if ratio < target else (lo, mid)
    state.config.threshold = best[1]
    return {
        "threshold_before": before_threshold,
        "ratio_before": before,
        "threshold_first_guess": guess,
        "threshold": best[1],
        "ratio_after": best[2],
        "calibration_tokens": int(sequences.numel()),
    }


def recalibrate(model: torch.nn.Module, router_dir: str | Path, sequences: torch.Tensor, target: float, unit: str,
                out: str | Path, note: str = "", command: str = "", tol: float = TOLERANCE) -> dict[str, float | str]:
    """Re-target the routers loaded from ``router_dir`` (on ``model``) to ``target``: move only the
    threshold, and save them to ``out`` with the original record and the re-calibration; ``command``
    is the re-calibrating command line, kept beside the original's training command. ``model`` may
    carry a LoRA adapter (PEFT): the threshold is then the fine-tuned model's."""
    result: dict[str, float | str] = {**calibrate_threshold(model, sequences, target, unit, tol=tol),
                                      "tolerance": tol, "calibration_text": note, "command": command}
    previous = read_router_config(router_dir)
    extra = {k: v for k, v in previous.items() if k not in ("format", "version", "router")}
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    save_routers(base, out, extra={**extra, "recalibrated_from": str(router_dir), "recalibration": result})
    return result
