"""``skipgpt compare``: every requested method at every requested ratio, one data pipeline,
one perplexity protocol, one table.

Each (method, ratio) gets a directory under ``out`` holding what it produced (a prune plan,
routers, a LoRA adapter) and ``row.json``; a finished row is reused, so an interrupted
comparison resumes where it stopped and adding a method re-runs only that method.
Calibration text (static methods) is the held-out tail of ``--data``, the same text router
tuning never trains on; evaluation text is never seen by any method.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import TuneConfig
from ..data import training_sequences
from ..errors import SkipGPTError
from ..evaluation.perplexity import perplexity
from ..evaluation.report import pct, table
from ..evaluation.zeroshot import evaluate_tasks, task_names
from ..files import write_json, write_text
from ..pause import pause_point
from ..routing.adapters import KINDS
from ..routing.save_load import load_routers
from ..training.finetune import FinetuneConfig, finetune
from ..training.tune import RESULTS_NAME, tune_routers
from .dynamic import dynamic_router_config
from .registry import DYNAMIC, STATIC, method_names
from .save_load import save_pruned
from .structure import module_parameter_counts

ROW_NAME = "row.json"


@dataclass
class CompareConfig:
    ratios: tuple[float, ...] = (0.25,)
    methods: tuple[str, ...] = ("all",)
    eval_specs: tuple[str, ...] = ("wikitext2", "ptb")
    seq_len: int = 1024  # evaluation windows
    max_windows: int | None = None
    calib_sequences: int = 8  # held-out calibration text for static methods
    calib_seq_len: int = 512
    tune: TuneConfig = field(default_factory=TuneConfig)  # the budget every dynamic method gets
    lora_steps: int = 0  # > 0 adds a "+ LoRA" row per static result (stage-2 recipe, dense mode)
    tasks: tuple[str, ...] = ()  # zero-shot tasks (lm-eval) scored for every row, beside perplexity
    task_limit: int | None = None
    include_dense: bool = True
    report_only: bool = False  # rebuild the table from finished rows; run nothing

    def resolved_methods(self) -> list[str]:
        names = method_names() if "all" in self.methods else list(self.methods)
        unknown = [m for m in names if m not in STATIC and m not in DYNAMIC]
        if unknown:
            raise SkipGPTError(f"unknown methods {unknown}; choose from: all, {', '.join(method_names())}")
        return names


@dataclass
class Inputs:
    """What every row shares: a way to get a fresh base model, the tokenizer, the texts."""

    fresh_model: Callable[[], torch.nn.Module]
    tokenizer: Any
    train_ids: torch.Tensor
    calib_ids: torch.Tensor
    eval_texts: dict[str, str]
    data_note: str
    model_name: str
    data_dir: str | None = None  # where zero-shot task files are (None: $SKIPGPT_DATA_DIR)


def split_training_text(tokenizer: Any, documents: list[str], cfg: CompareConfig) -> tuple[torch.Tensor, torch.Tensor]:
    train_ids, calib_ids = training_sequences(tokenizer, documents, cfg.tune.seq_len, cfg.calib_sequences, cfg.calib_seq_len)
    if calib_ids is None:
        raise SkipGPTError(f"the training text is too short to hold out {cfg.calib_sequences} × {cfg.calib_seq_len} calibration tokens")
    return train_ids, calib_ids


def _evaluate(model: torch.nn.Module, inputs: Inputs, cfg: CompareConfig, label: str) -> dict[str, Any]:
    evals: dict[str, Any] = {name: perplexity(model, inputs.tokenizer, text, seq_len=cfg.seq_len, max_windows=cfg.max_windows,
                                              desc=f"{label} {name}") for name, text in inputs.eval_texts.items()}
    if cfg.tasks:
        evals["zeroshot"] = evaluate_tasks(model, inputs.tokenizer, list(cfg.tasks), limit=cfg.task_limit, data_dir=inputs.data_dir)
    return evals


def _row(method: str, kind: str, target: float, achieved: float | None, evals: dict[str, Any], budget: str,
         wall: dict[str, float], artifacts: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    ppl = {name: r for name, r in evals.items() if name != "zeroshot"}
    split = next(iter(ppl.values()), {}).get("sparsity") or {}
    zeroshot = evals.get("zeroshot") or {}
    return {"method": method, "kind": kind, "target_ratio": target, "achieved_ratio": achieved,
            "attn_skipped": split.get("attn_sparsity"), "mlp_skipped": split.get("mlp_sparsity"),
            "ppl": {name: r["ppl"] for name, r in ppl.items()},
            "zeroshot": {t: zeroshot[t]["value"] for t in task_names(zeroshot)} if zeroshot else {},
            "eval": evals, "budget": budget,
            "wall_s": {k: round(v, 1) for k, v in wall.items()}, "artifacts": str(artifacts), **(extra or {})}


def _static_row(name: str, ratio: float, inputs: Inputs, cfg: CompareConfig, row_dir: Path) -> list[dict[str, Any]]:
    model = inputs.fresh_model()
    counts = module_parameter_counts(model).view(-1, len(KINDS))
    tick = time.perf_counter()
    plan = STATIC[name].prune(model, inputs.calib_ids, ratio)
    prune_s = time.perf_counter() - tick
    save_pruned(model, plan, row_dir)
    calib = f"{inputs.calib_ids.shape[0]} × {inputs.calib_ids.shape[1]} held-out calibration tokens"
    split = {f"{kind}_skipped": float(sum(counts[i, k] for i, kd in plan.removed if kd == kind) / counts[:, k].sum())
             for k, kind in enumerate(KINDS)} if plan.removed else {}
    removed = {**split, "removed_modules": [list(m) for m in plan.removed],
               "plan_extra": {k: v for k, v in plan.extra.items() if k != "trials"}}
    tick = time.perf_counter()
    evals = _evaluate(model, inputs, cfg, name)
    rows = [_row(name, "static", ratio, plan.achieved_ratio, evals, calib, {"prune": prune_s, "eval": time.perf_counter() - tick}, row_dir, removed)]
    if cfg.lora_steps:
        lora_cfg = FinetuneConfig(mode="dense", steps=cfg.lora_steps, seq_len=cfg.tune.seq_len, batch_size=cfg.tune.batch_size)
        tick = time.perf_counter()
        peft_model, _ = finetune(model, inputs.train_ids, lora_cfg, row_dir / "lora", progress=True)
        train_s = time.perf_counter() - tick
        peft_model.eval()
        tick = time.perf_counter()
        evals = _evaluate(peft_model, inputs, cfg, f"{name}+LoRA")
        tokens = cfg.lora_steps * lora_cfg.batch_size * lora_cfg.seq_len
        rows.append(_row(f"{name}, LoRA", "static + LoRA", ratio, plan.achieved_ratio, evals,
                         f"{calib}; LoRA {cfg.lora_steps} steps, {tokens:,} tokens",
                         {"prune": prune_s, "train": train_s, "eval": time.perf_counter() - tick}, row_dir / "lora", split))
    return rows


def _dynamic_row(name: str, ratio: float, inputs: Inputs, cfg: CompareConfig, row_dir: Path) -> list[dict[str, Any]]:
    model = inputs.fresh_model()
    tune_cfg = TuneConfig.from_dict({**cfg.tune.to_dict(), "target": ratio})
    if (row_dir / RESULTS_NAME).is_file():  # routers already trained here (an earlier, interrupted comparison)
        load_routers(model, row_dir)
        trained = json.loads((row_dir / RESULTS_NAME).read_text())
    else:
        trained = tune_routers(model, inputs.train_ids, tune_cfg, row_dir, router_config=dynamic_router_config(name, ratio),
                               calib_ids=inputs.calib_ids, resume=True, meta={"method": name})
    recipe = trained["tune"]
    tokens = recipe["steps"] * recipe["batch_size"] * recipe.get("grad_accum", 1) * recipe["seq_len"]
    tick = time.perf_counter()
    evals = _evaluate(model, inputs, cfg, name)
    achieved = next(r for name, r in evals.items() if name != "zeroshot")["sparsity"]["param_ratio"]
    budget = f"{recipe['steps']} steps, {tokens:,} training tokens, loss {recipe['loss']}"
    return [_row(name, "dynamic", ratio, achieved, evals, budget,
                 {"train": float(trained.get("wall_s") or 0.0), "eval": time.perf_counter() - tick},
                 row_dir, {"calibration": trained.get("calibration")})]


def run_compare(inputs: Inputs, cfg: CompareConfig, out: Path) -> list[dict[str, Any]]:
    """Run (or reuse) every row, then write ``comparison.json`` and ``comparison.md``."""
    out.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, float]] = [("dense", 0.0)] if cfg.include_dense else []
    jobs += [(m, r) for r in cfg.ratios for m in cfg.resolved_methods()]
    rows: list[dict[str, Any]] = []
    for method, ratio in jobs:
        row_dir = out / (method if method == "dense" else f"{method}_{ratio:g}")
        done = row_dir / ROW_NAME
        if done.is_file():
            rows += json.loads(done.read_text())
            print(f"[compare] reusing {done}")
            continue
        if cfg.report_only:
            print(f"[compare] {method} at ratio {ratio:g}: not run yet, left out of the report")
            continue
        print(f"[compare] {method} at ratio {ratio:g}")
        if method == "dense":
            tick = time.perf_counter()
            made = [_row("dense", "dense", 0.0, 0.0, _evaluate(inputs.fresh_model(), inputs, cfg, "dense"), "-",
                         {"eval": time.perf_counter() - tick}, row_dir)]
        elif method in STATIC:
            if row_dir.exists():  # a static method that stopped half-way: nothing worth keeping
                shutil.rmtree(row_dir)
            made = _static_row(method, ratio, inputs, cfg, row_dir)
        else:
            made = _dynamic_row(method, ratio, inputs, cfg, row_dir)
        row_dir.mkdir(parents=True, exist_ok=True)
        write_json(done, made)
        rows += made
        write_report(rows, inputs, cfg, out)
        pause_point("compare-row")
    write_report(rows, inputs, cfg, out)
    return rows


def write_report(rows: list[dict[str, Any]], inputs: Inputs, cfg: CompareConfig, out: Path) -> str:
    names = list(inputs.eval_texts)
    tasks = sorted({t for r in rows for t in r.get("zeroshot", {})})
    windows = "all windows" if cfg.max_windows is None else f"first {cfg.max_windows} windows"
    headers = ["method", "target", "achieved ratio", "attn / MLP skipped", *[f"{n} PPL" for n in names],
               *[f"{t} (%)" for t in tasks], "budget", "wall time"]
    body = []
    for r in rows:
        split = "" if r["attn_skipped"] is None else f"{pct(r['attn_skipped'])} / {pct(r['mlp_skipped'])}"
        wall = " + ".join(f"{k} {v:.0f} s" for k, v in r["wall_s"].items())
        body.append([r["method"], pct(r["target_ratio"]), pct(r["achieved_ratio"]), split,
                     *[r["ppl"].get(n) for n in names],
                     *[None if t not in r.get("zeroshot", {}) else round(100 * r["zeroshot"][t], 1) for t in tasks],
                     r["budget"], wall])
    text = (f"# Comparison on {inputs.model_name}\n\nCalibration and training text: {inputs.data_note}. "
            f"Token perplexity, seq-len {cfg.seq_len}, {windows} of each set, BOS by the tokenizer's convention (none for SmolLM2). Ratio = share of decoder-layer parameters removed (static) or skipped per token (dynamic, "
            f"measured on the first evaluation set).\n\n" + table(headers, body) + "\n")
    write_text(out / "comparison.md", text)
    write_json(out / "comparison.json", {"model": inputs.model_name, "config": _jsonable(cfg), "rows": rows})
    return text


def _jsonable(cfg: CompareConfig) -> dict[str, Any]:
    return {**{k: v for k, v in cfg.__dict__.items() if k != "tune"}, "tune": cfg.tune.to_dict()}
