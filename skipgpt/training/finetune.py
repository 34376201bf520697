"""Stage 2: LoRA recovery with frozen routers (SkipGPT-RT-L), and its two reference points.

``mode="routed"``: routers frozen with argmax routing, LoRA (PEFT) on the attention and MLP
projections: the paper's SkipGPT-RT-L. ``mode="joint"``: routers (Gumbel, τ schedule, sparsity
loss) and LoRA trained together from the start: the SkipGPT-Joint ablation. ``mode="dense"``:
the same LoRA recipe with no routers, the "Dense + LoRA" row.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import get_cosine_schedule_with_warmup

from ..config import JsonConfig, TuneConfig, check_target
from ..errors import SkipGPTError
from ..files import write_json
from ..lora import check_adapter_dir
from ..next_token import final_hidden_states
from ..routing.save_load import load_routers_state_dict, routers_state_dict, save_routers
from ..routing.surgery import (
    gate_mode,
    has_routers,
    layer_outputs,
    replacement_parameters,
    router_parameters,
    routing_state,
    set_gate_mode,
)
from . import checkpoint
from .calibrate import achieved_ratio, calibrate_threshold
from .loop import LoopSpec, run_loop, run_summary
from .losses import Teacher, TeacherOutput, lm_loss, routed_loss
from .tune import RESULTS_NAME, tau_at

Mode = Literal["routed", "joint", "dense"]
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig(JsonConfig):
    """LoRA fine-tuning; defaults are the paper's (lr 2e-4, 10 % warm-up, cosine, β = (0.9, 0.95))."""

    mode: Mode = "routed"
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-4
    warmup_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    loss: Literal["nll", "kl"] = "nll"  # the paper fine-tunes on the LM loss; "kl" distils the base model
    # RT-L: also train the replacements of skipped modules (at ``lr``), which stage 1 fitted under
    # noisy routing; the skip decisions stay frozen either way.
    train_replacements: bool = False
    seed: int = 0
    save_every: int = 50
    bf16: bool = False  # autocast; LoRA weights, routers and replacements stay float32
    # RT-L: LoRA moves the hidden states the frozen routers read, so the stage-1 threshold no longer
    # delivers the ratio it was set for. After training the threshold is re-set on the held-out
    # calibration text to ``target``, by default the ratio the stage-1 routers delivered on that text
    # before LoRA. False keeps the stage-1 threshold.
    calibrate: bool = True
    target: float | None = None
    # Joint mode only: the router half of the recipe (target, unit, α, τ schedule, router lr).
    joint: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("routed", "joint", "dense"):
            raise SkipGPTError(f"finetune mode must be 'routed', 'joint' or 'dense', got {self.mode!r}")
        if isinstance(self.joint, dict):
            self.joint = TuneConfig.from_dict(self.joint)
        self.betas = tuple(self.betas)
        self.lora_targets = tuple(self.lora_targets)
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "lora_r"):
            if getattr(self, name) < 1:
                raise SkipGPTError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.target is not None and self.mode != "routed":
            raise SkipGPTError("finetune's target re-calibrates RT-L (--routers DIR); --joint takes its own --target")
        if self.target is not None:
            check_target(self.target)
        if self.train_replacements and self.mode != "routed":
            raise SkipGPTError("--train-replacements belongs to SkipGPT-RT-L (--routers DIR): joint mode trains them "
                               "with its routers, and dense fine-tuning has none")


def add_lora(model: torch.nn.Module, cfg: FinetuneConfig) -> PeftModel:
    """Wrap the projections with LoRA adapters (PEFT); routers, being no target, stay as they are."""
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise SkipGPTError(f"cannot add LoRA to {cfg.lora_targets}: {err}") from None


def _staged(out: Path, fill: Callable[[Path], Any]) -> None:
    """Files written by ``fill`` into a staging folder beside their final place, then renamed one
    by one: no file under its final name is ever half-written, whenever the process is killed."""
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        fill(staging)
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_adapter(peft_model: PeftModel, out: Path) -> None:
    _staged(out, lambda staging: peft_model.save_pretrained(str(staging)))  # PEFT writes its files in place


def copy_adapter(adapter_dir: str | Path, out: str | Path) -> None:
    """Put a saved adapter beside re-calibrated routers, so that ``--routers OUT --adapter OUT``
    is again one RT-L model."""
    check_adapter_dir(adapter_dir)
    files = sorted(Path(adapter_dir).glob("adapter_*"))  # PEFT's adapter_config.json and weights
    _staged(Path(out), lambda staging: [shutil.copy2(f, staging / f.name) for f in files])


def _base_model_teacher(peft_model: PeftModel) -> Teacher:
    """Distillation target for stage 2: the base model itself, adapters off, every module on; its
    final hidden states, from which the loss computes log-probabilities chunk by chunk."""

    def teacher(_model: torch.nn.Module, batch: torch.Tensor, hidden: bool = False) -> TeacherOutput:
        routing = gate_mode(peft_model, "dense") if has_routers(peft_model) else contextlib.nullcontext()
        with torch.no_grad(), peft_model.disable_adapter(), routing, layer_outputs(peft_model, hidden) as states:
            return final_hidden_states(peft_model, batch), states

    return teacher


def _stage1_ratio(model: torch.nn.Module, cfg: FinetuneConfig, calib_ids: torch.Tensor | None) -> dict[str, float] | None:
    """What RT-L re-calibrates to, measured before LoRA moves anything: the stage-1 routers' ratio
    on the calibration text (and their threshold), and the target (``cfg.target`` or that ratio)."""
    if cfg.mode != "routed" or not cfg.calibrate or calib_ids is None:
        return None
    state = routing_state(model)
    ratio = achieved_ratio(model, calib_ids, cfg.joint.target_unit)
    return {"target": ratio if cfg.target is None else cfg.target, "ratio_stage1": ratio,
            "threshold_stage1": state.config.threshold}


def finetune(
    model: torch.nn.Module,
    train_ids: torch.Tensor,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    calib_ids: torch.Tensor | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[PeftModel, dict[str, Any]]:
    """Fine-tune ``model`` (routed unless ``cfg.mode == "dense"``) with LoRA; write the adapter the
    PEFT way beside the router files, plus ``train_log.jsonl`` and ``results.json``.

    Joint mode trains its routers from scratch, so, like ``tune``, it calibrates their threshold on
    ``calib_ids`` (held-out training text) afterwards: the ablation then compares at the same ratio.
    RT-L re-sets the frozen routers' threshold there too (``cfg.calibrate``), to the ratio they
    delivered before LoRA (or ``cfg.target``): the LoRA moves the hidden states they read.
    """
    out = Path(out_dir)
    routed = cfg.mode != "dense"
    if routed != has_routers(model):
        raise SkipGPTError(
            "SkipGPT-RT-L and joint fine-tuning need routers (--routers DIR for RT-L); dense fine-tuning takes none"
            if routed else "dense fine-tuning must not have routers"
        )
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed + accelerator.process_index)
    routers_before = routers_state_dict(model) if routed else {}
    stage1 = _stage1_ratio(model, cfg, calib_ids) if accelerator.is_main_process else None
    peft_model = add_lora(model, cfg)  # freezes everything but LoRA
    groups = [{"params": [p for n, p in peft_model.named_parameters() if "lora_" in n], "lr": cfg.lr}]
    trained_router_params: list[torch.nn.Parameter] = []
    if cfg.mode == "joint":
        trained_router_params = router_parameters(model)
    elif cfg.train_replacements:
        trained_router_params = replacement_parameters(model)
        if not trained_router_params:
            raise SkipGPTError("--train-replacements: these routers have no replacements (tuned with --replacement none)")
    for p in trained_router_params:
        p.requires_grad_(True)
    if trained_router_params:
        groups.append({"params": trained_router_params, "lr": cfg.joint.lr if cfg.mode == "joint" else cfg.lr})
    peft_model.train()
    optimizer = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * cfg.steps), cfg.steps)
    ddp_model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)
    teacher = _base_model_teacher(peft_model)

    def step_loss(m: torch.nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if cfg.mode == "joint":
            tau = tau_at(step, cfg.steps, cfg.joint.tau_start, cfg.joint.tau_end)
            set_gate_mode(model, "gumbel", tau=tau)
            loss, parts = routed_loss(m, batch, TuneConfig.from_dict({**cfg.joint.to_dict(), "loss": cfg.loss, "hidden_distill": 0.0}), teacher)
            return loss, {**parts, "tau": tau}
        if routed:
            set_gate_mode(model, "argmax")  # frozen routers, deterministic decisions
        loss, _ = lm_loss(m, batch, cfg.loss, teacher)
        parts = {"lm_loss": float(loss.detach())}
        if routed:
            parts["sparsity"] = float(routing_state(model).last_stats().params)
        return loss, parts

    def weights() -> dict[str, torch.Tensor]:
        lora = {f"lora.{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
        return {**lora, **({f"router.{k}": v for k, v in routers_state_dict(model).items()} if trained_router_params else {})}

    def load_weights(saved: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(peft_model, {k[5:]: v for k, v in saved.items() if k.startswith("lora.")})
        if trained_router_params:
            load_routers_state_dict(model, {k[7:]: v for k, v in saved.items() if k.startswith("router.")})

    fingerprint = {"finetune": cfg.to_dict(), "data_shape": list(train_ids.shape)}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    last = run_loop(
        accelerator, ddp_model, optimizer, scheduler, train_ids,
        LoopSpec(cfg.steps, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.save_every, fingerprint, cfg.bf16),
        step_loss, out, resume=resume, weights=weights, load_weights=load_weights,
        desc=f"LoRA ({cfg.mode})", progress=progress,
    )
    peft_model.eval()
    calibration: dict[str, Any] | None = None
    if routed:
        set_gate_mode(model, "argmax")
        if cfg.mode == "joint" and cfg.calibrate and cfg.joint.calibrate and calib_ids is not None and accelerator.is_main_process:
            calibration = calibrate_threshold(peft_model, calib_ids, cfg.joint.target, cfg.joint.target_unit)
        if stage1 is not None and accelerator.is_main_process:
            calibration = {**stage1, **calibrate_threshold(peft_model, calib_ids, stage1["target"], cfg.joint.target_unit)}
            print(f"skipgpt: RT-L ratio on the calibration text: {stage1['ratio_stage1']:.4f} before LoRA, "
                  f"{calibration['ratio_before']:.4f} after it at the stage-1 threshold, {calibration['ratio_after']:.4f} "
                  f"with the threshold re-set for {stage1['target']:.4f}", file=sys.stderr)
        if cfg.mode == "routed" and any(
            not torch.equal(routers_before[k], v) for k, v in routers_state_dict(model).items()
            if not (cfg.train_replacements and ".replacement." in k)
        ):
            raise SkipGPTError("internal error: frozen routers changed during fine-tuning")
    results = {
        "stage": {"routed": "SkipGPT-RT-L", "joint": "SkipGPT-Joint", "dense": "Dense + LoRA"}[cfg.mode],
        "finetune": cfg.to_dict(),
        "router": routing_state(model).config.to_dict() if routed else None,
        **run_summary(accelerator, last, start),
        "calibration": calibration,
        **(meta or {}),
    }
    if accelerator.is_main_process:
        _save_adapter(peft_model, out)
        if routed:
            save_routers(model, out, extra={"training": cfg.to_dict(), **(meta or {})})
        write_json(out / RESULTS_NAME, results)
        checkpoint.remove(out)
    accelerator.wait_for_everyone()
    return peft_model, results
