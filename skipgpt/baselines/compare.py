"""``skipgpt compare``: every requested method at every requested ratio, one data pipeline,
one perplexity protocol, one zero-shot sample, one table: the paper's scoreboard.

Rows come in two stages. Stage 1: dense, every static and dynamic method at every ratio, and any
already trained router sets (``router_sets``, e.g. the shipped ones). Stage 2 (``lora_steps`` > 0),
each with the same LoRA budget: dense + LoRA, SkipGPT-RT-L (LoRA over each SkipGPT-RT row's frozen
routers), SkipGPT-Joint (routers and LoRA from scratch, as many steps as RT plus RT-L, so the same
training tokens) and the ``lora_static`` best static methods of each ratio (by perplexity on the
first evaluation set) + LoRA.

Each row gets a directory under ``out`` holding what it produced (a prune plan, routers, a LoRA
adapter) and ``row.json``; a finished row is reused, so an interrupted comparison resumes where it
stopped and adding a method re-runs only that method. Within a row, each finished evaluation set
and zero-shot task is kept under ``partial/`` (with the pruning or training it scores) until
``row.json`` is written, so a row stopped during its half hour of evaluation resumes at the set
it was in. Calibration text (static methods, threshold
calibration) is the held-out tail of ``--data``, the text router tuning never trains on;
evaluation text is never seen by any method. Every row is scored on the same zero-shot examples
(a seeded subset, ``task_sample``), so its accuracy can be compared to dense paired
(:mod:`skipgpt.evaluation.scoreboard`, written as ``scoreboard.{json,md,png}``).
"""

from __future__ import annotations

import hashlib
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
from ..evaluation.scoreboard import build_scoreboard, write_scoreboard
from ..evaluation.zeroshot import evaluate_tasks, task_names
from ..files import safe_name, write_json, write_text
from ..identity import code_revision
from ..lora import load_adapter
from ..pause import pause_point
from ..routing.adapters import KINDS
from ..routing.save_load import CONFIG_NAME as ROUTER_CONFIG_NAME
from ..routing.save_load import WEIGHTS_NAME as ROUTER_WEIGHTS_NAME
from ..routing.save_load import load_routers, read_router_config, router_dir
from ..routing.surgery import attach_routers, detach_routers, has_routers
from ..training.finetune import FinetuneConfig, finetune
from ..training.tune import RESULTS_NAME, tune_routers
from .dynamic import dynamic_router_config
from .partial import PARTIAL_DIR, digest, kept_or_scored, partial_dir
from .registry import DYNAMIC, STATIC, method_label, method_names
from .save_load import PLAN_NAME, load_pruned, save_pruned
from .structure import module_parameter_counts

ROW_NAME = "row.json"
PRUNE_TIME_NAME = "prune_time.json"  # written after a static row's plan: the pruning is done and kept
SCOREBOARD_STEM = "scoreboard"
RT = "skipgpt-rt"  # the method stage 2 builds SkipGPT-RT-L and SkipGPT-Joint from
ROUTER_SET = "router-set"  # rows of trained router sets (CompareConfig.router_sets)


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
    lora_steps: int = 0  # > 0: the stage-2 rows (module docstring), each with this many LoRA steps
    lora_static: int = 3  # static methods per ratio that get a "+ LoRA" row, best first
    # Stage 2's recipe, the same for every LoRA row (dense, static, RT-L, joint): the paper's lr
    # 2e-4 by default; the project's stage 2 (docs/small-budget.md) is lr 8e-4 under bf16 autocast.
    lora_lr: float = FinetuneConfig.lr
    lora_bf16: bool = False
    lora_train_replacements: bool = False  # RT-L rows only: the replacements train with LoRA
    tasks: tuple[str, ...] = ()  # zero-shot tasks (lm-eval) scored for every row, beside perplexity
    task_limit: int | None = None  # the first N examples of each task
    task_sample: int | None = None  # or a seeded subset of N, the same for every row
    task_seed: int = 0
    router_sets: tuple[tuple[str, str], ...] = ()  # (label, builtin name or directory): trained sets scored as rows
    include_dense: bool = True
    report_only: bool = False  # rebuild the table from finished rows; run nothing
    command: str = ""  # recorded in every row

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


@dataclass(frozen=True)
class Job:
    """One row to run (or reuse): its directory under ``out`` and how to make it."""

    key: str
    method: str
    ratio: float
    make: Callable[[Path], dict[str, Any]]


def split_training_text(tokenizer: Any, documents: list[str], cfg: CompareConfig) -> tuple[torch.Tensor, torch.Tensor]:
    train_ids, calib_ids = training_sequences(tokenizer, documents, cfg.tune.seq_len, cfg.calib_sequences, cfg.calib_seq_len)
    if calib_ids is None:
        raise SkipGPTError(f"the training text is too short to hold out {cfg.calib_sequences} × {cfg.calib_seq_len} calibration tokens")
    return train_ids, calib_ids


def _evaluate(model: torch.nn.Module, inputs: Inputs, cfg: CompareConfig, label: str, row_dir: Path,
              made_from: str) -> tuple[dict[str, Any], float]:
    """Every evaluation set and task, and the seconds they took (those of a part finished before a
    stop included). ``made_from`` identifies the model (the file its training or pruning wrote
    last): parts kept for another model are dropped, never scored as this one's."""
    partial = partial_dir(row_dir, made_from)
    evals: dict[str, Any] = {}
    seconds = 0.0
    for name, text in inputs.eval_texts.items():
        setting = {"text_sha1": hashlib.sha1(text.encode()).hexdigest(), "seq_len": cfg.seq_len, "max_windows": cfg.max_windows}
        saved = kept_or_scored(partial, name, setting, lambda text=text, name=name: perplexity(
            model, inputs.tokenizer, text, seq_len=cfg.seq_len, max_windows=cfg.max_windows, desc=f"{label} {name}"))
        evals[name] = saved["result"]
        seconds += saved["wall_s"]
    if cfg.tasks:
        zeroshot = evaluate_tasks(model, inputs.tokenizer, list(cfg.tasks), limit=cfg.task_limit, sample=cfg.task_sample,
                                  sample_seed=cfg.task_seed, data_dir=inputs.data_dir, resume_dir=partial / "zeroshot")
        evals["zeroshot"] = zeroshot
        seconds += sum(zeroshot[t]["wall_s"] for t in task_names(zeroshot))  # each task's own time, finished earlier or now
    return evals, seconds


def _row(method: str, label: str, kind: str, target: float, achieved: float | None, evals: dict[str, Any], budget: str,
         wall: dict[str, float], artifacts: Path, cfg: CompareConfig, train_tokens: int = 0,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    ppl = {name: r for name, r in evals.items() if name != "zeroshot"}
    split = next(iter(ppl.values()), {}).get("sparsity") or {}
    zeroshot = evals.get("zeroshot") or {}
    tasks = task_names(zeroshot)
    # The ratio each evaluation set got: routing decides per token, so it differs by text; a
    # static model removes the same parameters everywhere.
    ratios = {name: (r.get("sparsity") or {}).get("param_ratio", achieved) for name, r in evals.items()}
    return {"method": method, "label": label, "kind": kind, "target_ratio": target, "achieved_ratio": achieved,
            "ratios": ratios, "attn_skipped": split.get("attn_sparsity"), "mlp_skipped": split.get("mlp_sparsity"),
            "ppl": {name: r["ppl"] for name, r in ppl.items()},
            "zeroshot": {t: zeroshot[t]["value"] for t in tasks},
            "zeroshot_examples": {t: zeroshot[t]["examples"] for t in tasks},  # kept once, here, not again under "eval"
            "eval": {**evals, **({"zeroshot": {**zeroshot, **{t: {k: v for k, v in zeroshot[t].items() if k != "examples"}
                                                            for t in tasks}}} if zeroshot else {})},
            "budget": budget, "train_tokens": train_tokens,
            "wall_s": {k: round(v, 1) for k, v in wall.items()}, "artifacts": str(artifacts),
            "command": cfg.command, "commit": code_revision(), **(extra or {})}


def _lora_config(cfg: CompareConfig, mode: str, steps: int | None = None, **extra: Any) -> FinetuneConfig:
    """Every LoRA row's recipe: one learning rate and precision for all, so that only what LoRA
    starts from differs; trained replacements exist on routed (RT-L) rows only."""
    return FinetuneConfig(mode=mode, steps=steps or cfg.lora_steps, seq_len=cfg.tune.seq_len, batch_size=cfg.tune.batch_size,
                          lr=cfg.lora_lr, bf16=cfg.lora_bf16, train_replacements=cfg.lora_train_replacements and mode == "routed",
                          **extra)


def _dense_row(inputs: Inputs, cfg: CompareConfig, row_dir: Path) -> dict[str, Any]:
    evals, eval_s = _evaluate(inputs.fresh_model(), inputs, cfg, "dense", row_dir, f"dense {inputs.model_name}")
    return _row("dense", "Dense", "dense", 0.0, 0.0, evals, "-", {"eval": eval_s}, row_dir, cfg)


def _static_row(name: str, ratio: float, inputs: Inputs, cfg: CompareConfig, row_dir: Path) -> dict[str, Any]:
    model = inputs.fresh_model()
    counts = module_parameter_counts(model).view(-1, len(KINDS))
    timing = row_dir / PRUNE_TIME_NAME
    if timing.is_file():  # pruned before a stop during its evaluation: the saved plan, not a second pruning
        plan = load_pruned(model, row_dir)
        prune_s = json.loads(timing.read_text())["prune_s"]
    else:
        if row_dir.exists():  # stopped while pruning: nothing worth keeping
            shutil.rmtree(row_dir)
        tick = time.perf_counter()
        plan = STATIC[name].prune(model, inputs.calib_ids, ratio)
        prune_s = time.perf_counter() - tick
        save_pruned(model, plan, row_dir)
        write_json(timing, {"prune_s": prune_s})
    calib = f"{inputs.calib_ids.shape[0]} × {inputs.calib_ids.shape[1]} held-out calibration tokens"
    split = {f"{kind}_skipped": float(sum(counts[i, k] for i, kd in plan.removed if kd == kind) / counts[:, k].sum())
             for k, kind in enumerate(KINDS)} if plan.removed else {}
    removed = {**split, "removed_modules": [list(m) for m in plan.removed],
               "plan_extra": {k: v for k, v in plan.extra.items() if k != "trials"}}
    evals, eval_s = _evaluate(model, inputs, cfg, name, row_dir, digest(row_dir / PLAN_NAME, timing))
    return _row(name, method_label(name), "static", ratio, plan.achieved_ratio, evals, calib,
                {"prune": prune_s, "eval": eval_s}, row_dir, cfg, extra=removed)


def _dynamic_row(name: str, ratio: float, inputs: Inputs, cfg: CompareConfig, row_dir: Path) -> dict[str, Any]:
    model = inputs.fresh_model()
    tune_cfg = TuneConfig.from_dict({**cfg.tune.to_dict(), "target": ratio, **dict(DYNAMIC[name].tune_overrides)})
    if (row_dir / RESULTS_NAME).is_file():  # routers already trained here (an earlier, interrupted comparison)
        load_routers(model, row_dir)
        trained = json.loads((row_dir / RESULTS_NAME).read_text())
    else:
        trained = tune_routers(model, inputs.train_ids, tune_cfg, row_dir, router_config=dynamic_router_config(name, ratio),
                               calib_ids=inputs.calib_ids, resume=True, meta={"method": name})
    recipe, tokens = trained["tune"], trained["tokens_trained"]
    evals, eval_s = _evaluate(model, inputs, cfg, name, row_dir, digest(row_dir / RESULTS_NAME))
    budget = f"{recipe['steps']} steps, {tokens:,} training tokens, loss {recipe['loss']}"
    return _row(name, method_label(name), "dynamic", ratio, _routed_ratio(evals), evals, budget,
                {"train": float(trained.get("wall_s") or 0.0), "eval": eval_s},
                row_dir, cfg, tokens, {"calibration": trained.get("calibration")})


def _routed_ratio(evals: dict[str, Any]) -> float:
    return next(r for name, r in evals.items() if name != "zeroshot")["sparsity"]["param_ratio"]


def _router_set_row(label: str, spec: str, inputs: Inputs, cfg: CompareConfig, row_dir: Path) -> dict[str, Any]:
    """A router set trained elsewhere (the shipped ones): scored by the same protocol; its budget
    is what its own config records (a router set ships no training results, so tokens are
    counted from the recipe)."""
    recipe = read_router_config(spec).get("training") or {}
    model = inputs.fresh_model()
    load_routers(model, spec)
    source = router_dir(spec)
    evals, eval_s = _evaluate(model, inputs, cfg, label, row_dir,
                              digest(source / ROUTER_WEIGHTS_NAME, source / ROUTER_CONFIG_NAME))
    tokens = recipe["steps"] * recipe["batch_size"] * recipe.get("grad_accum", 1) * recipe["seq_len"] if recipe else 0
    budget = f"{recipe['steps']} steps, {tokens:,} training tokens, loss {recipe['loss']}" if recipe else "not recorded"
    return _row(ROUTER_SET, label, "dynamic", recipe.get("target", _routed_ratio(evals)), _routed_ratio(evals), evals,
                f"router set {spec}: {budget}", {"eval": eval_s}, row_dir, cfg, tokens, {"routers": spec})


def _lora_row(method: str, label: str, kind: str, ratio: float, model: torch.nn.Module, lora: FinetuneConfig,
              inputs: Inputs, cfg: CompareConfig, row_dir: Path, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train LoRA on ``model`` (dense, pruned or routed) and score it; ``before`` is the row it
    starts from, whose training budget and time count in this one."""
    finished = _finished_finetune(model, lora, row_dir)
    peft_model, result = finished or finetune(model, inputs.train_ids, lora, row_dir, resume=True, calib_ids=inputs.calib_ids,
                                              progress=True)
    train_s = result["wall_s"]  # every sitting's share of a fine-tuning resumed from its checkpoints
    peft_model.eval()
    evals, eval_s = _evaluate(peft_model, inputs, cfg, label, row_dir, digest(row_dir / RESULTS_NAME))
    tokens = result["tokens_trained"]
    routed = lora.mode != "dense"
    prior = before or {}
    recipe = f"lr {lora.lr:g}{', bf16' if lora.bf16 else ''}{', replacements trained' if lora.train_replacements else ''}"
    budget = f"{prior['budget']}; LoRA {lora.steps} steps, {tokens:,} tokens, {recipe}" if before else \
        f"{lora.steps} steps, {tokens:,} training tokens (mode {lora.mode}, {recipe})"
    stage1 = {f"stage 1 {k}": v for k, v in prior.get("wall_s", {}).items() if k != "eval"}
    row = _row(method, label, kind, ratio, _routed_ratio(evals) if routed else prior.get("achieved_ratio", 0.0), evals, budget,
               {**stage1, "LoRA": train_s, "eval": eval_s}, row_dir, cfg, prior.get("train_tokens", 0) + tokens,
               {"calibration": result.get("calibration")} if routed else None)
    if before and not routed:  # a pruned model: the parameters its plan removed, on every set
        row.update(ratios={name: before["achieved_ratio"] for name in row["ratios"]},
                   attn_skipped=before["attn_skipped"], mlp_skipped=before["mlp_skipped"])
    return row


def _finished_finetune(model: torch.nn.Module, lora: FinetuneConfig, row_dir: Path) -> tuple[Any, dict[str, Any]] | None:
    """A LoRA row whose fine-tuning finished but whose evaluation did not (a sitting that stopped
    there): its adapter, routers and ``results.json`` are on disk, so the row is evaluated from them
    instead of trained again. ``results.json`` is written last, and only a run of this very recipe counts."""
    path = row_dir / RESULTS_NAME
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if FinetuneConfig.from_dict(result["finetune"]) != lora:
        return None
    if has_routers(model):  # the threshold re-set after LoRA, and replacements trained with it, are the saved ones
        detach_routers(model)
        load_routers(model, row_dir)
    print(f"[compare] the fine-tuning in {row_dir} finished earlier: evaluating it, not training again")
    return load_adapter(model, row_dir), result


def _stage1_jobs(inputs: Inputs, cfg: CompareConfig) -> list[Job]:
    jobs = [Job("dense", "dense", 0.0, lambda d: _dense_row(inputs, cfg, d))] if cfg.include_dense else []
    for label, spec in cfg.router_sets:
        key = "set_" + safe_name(Path(spec).name or spec)
        jobs.append(Job(key, ROUTER_SET, 0.0, lambda d, label=label, spec=spec: _router_set_row(label, spec, inputs, cfg, d)))
    for ratio in cfg.ratios:
        for m in cfg.resolved_methods():
            run = _static_row if m in STATIC else _dynamic_row
            jobs.append(Job(f"{m}_{ratio:g}", m, ratio, lambda d, m=m, ratio=ratio, run=run: run(m, ratio, inputs, cfg, d)))
    return jobs


def _stage2_jobs(inputs: Inputs, cfg: CompareConfig, rows: list[dict[str, Any]]) -> list[Job]:
    """The LoRA rows, decided from the finished stage-1 rows (which static methods are best)."""
    first_set = next(iter(inputs.eval_texts), None)

    def dense_lora(d: Path) -> dict[str, Any]:
        return _lora_row("dense, LoRA", "Dense + LoRA", "dense + LoRA", 0.0, inputs.fresh_model(), _lora_config(cfg, "dense"),
                         inputs, cfg, d)

    def rt_l(base: dict[str, Any], d: Path) -> dict[str, Any]:
        model = inputs.fresh_model()
        load_routers(model, base.get("routers") or base["artifacts"])
        label = "SkipGPT-RT-L" if base["method"] == RT else f"{base['label']} + LoRA"
        return _lora_row(f"{base['method']}, LoRA", label, "dynamic + LoRA", base["target_ratio"], model,
                         _lora_config(cfg, "routed"), inputs, cfg, d, base)

    def joint(ratio: float, d: Path) -> dict[str, Any]:
        model = inputs.fresh_model()
        attach_routers(model, dynamic_router_config(RT, ratio))
        lora = _lora_config(cfg, "joint", cfg.tune.steps * cfg.tune.grad_accum + cfg.lora_steps,
                            joint=TuneConfig.from_dict({**cfg.tune.to_dict(), "target": ratio}))
        return _lora_row("skipgpt-joint", "SkipGPT-Joint", "dynamic + LoRA", ratio, model, lora, inputs, cfg, d)

    def static_lora(base: dict[str, Any], d: Path) -> dict[str, Any]:
        model = inputs.fresh_model()
        load_pruned(model, base["artifacts"])
        return _lora_row(f"{base['method']}, LoRA", f"{base['label']} + LoRA", "static + LoRA", base["target_ratio"], model,
                         _lora_config(cfg, "dense"), inputs, cfg, d, base)

    jobs = [Job("dense_lora", "dense, LoRA", 0.0, dense_lora)] if cfg.include_dense else []
    for base in (r for r in rows if r["method"] == ROUTER_SET):
        jobs.append(Job(f"{Path(base['artifacts']).name}_lora", f"{base['label']}, LoRA", base["target_ratio"],
                        lambda d, b=base: rt_l(b, d)))
    for ratio in cfg.ratios:
        at = [r for r in rows if r["target_ratio"] == ratio and r["method"] != ROUTER_SET]
        for base in (r for r in at if r["method"] == RT):
            jobs.append(Job(f"{RT}_{ratio:g}_lora", f"{RT}, LoRA", ratio, lambda d, b=base: rt_l(b, d)))
        if RT in cfg.resolved_methods():
            jobs.append(Job(f"skipgpt-joint_{ratio:g}", "skipgpt-joint", ratio, lambda d, ratio=ratio: joint(ratio, d)))
        static = sorted((r for r in at if r["kind"] == "static"), key=lambda r: r["ppl"].get(first_set, float("inf")))
        for base in static[: cfg.lora_static]:
            jobs.append(Job(f"{base['method']}_{ratio:g}_lora", f"{base['method']}, LoRA", ratio,
                            lambda d, b=base: static_lora(b, d)))
    return jobs


def _run_jobs(jobs: list[Job], inputs: Inputs, cfg: CompareConfig, out: Path, rows: list[dict[str, Any]],
              pending: list[str]) -> None:
    """Run or reuse each job's row; under ``report_only`` the unfinished ones go to ``pending``."""
    for job in jobs:
        row_dir = out / job.key
        done = row_dir / ROW_NAME
        if done.is_file():
            rows += json.loads(done.read_text())
            print(f"[compare] reusing {done}")
            continue
        if cfg.report_only:
            print(f"[compare] {job.method} at ratio {job.ratio:g}: not run yet, left out of the report")
            pending.append(job.key)  # the row's directory under --out: unique, and names its ratio
            continue
        print(f"[compare] {job.method} at ratio {job.ratio:g}")
        made = job.make(row_dir)
        row_dir.mkdir(parents=True, exist_ok=True)
        write_json(done, [made])  # a list: rows of earlier versions held two rows
        shutil.rmtree(row_dir / PARTIAL_DIR, ignore_errors=True)  # the row holds it all now
        rows.append(made)
        write_report(rows, inputs, cfg, out)
        pause_point("compare-row")


def run_compare(inputs: Inputs, cfg: CompareConfig, out: Path) -> list[dict[str, Any]]:
    """Run (or reuse) every row, then write ``comparison.{json,md}`` and ``scoreboard.{json,md,png}``."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    pending: list[str] = []
    _run_jobs(_stage1_jobs(inputs, cfg), inputs, cfg, out, rows, pending)
    if cfg.lora_steps:
        _run_jobs(_stage2_jobs(inputs, cfg, rows), inputs, cfg, out, rows, pending)
    write_report(rows, inputs, cfg, out, pending)
    return rows


def write_report(rows: list[dict[str, Any]], inputs: Inputs, cfg: CompareConfig, out: Path,
                 pending: list[str] | None = None) -> str:
    """``comparison.{md,json}`` and the scoreboard from the finished rows; ``pending`` names the rows
    a ``--report-only`` run found unfinished (stage-2 rows wait for their stage-1 rows to be known)."""
    names = list(inputs.eval_texts)
    tasks = sorted({t for r in rows for t in r.get("zeroshot", {})})
    windows = "all windows" if cfg.max_windows is None else f"first {cfg.max_windows} windows"
    headers = ["method", "target", "achieved ratio", "attn / MLP skipped", *[f"{n} PPL" for n in names],
               *[f"{t} (%)" for t in tasks], "budget", "wall time"]
    body = []
    for r in rows:
        split = "" if r.get("attn_skipped") is None else f"{pct(r['attn_skipped'])} / {pct(r['mlp_skipped'])}"
        wall = " + ".join(f"{k} {v:.0f} s" for k, v in r["wall_s"].items())
        body.append([r.get("label") or r["method"], pct(r["target_ratio"]), pct(r["achieved_ratio"]), split,
                     *[r["ppl"].get(n) for n in names],
                     *[None if t not in r.get("zeroshot", {}) else round(100 * r["zeroshot"][t], 1) for t in tasks],
                     r["budget"], wall])
    protocol = (f"Token perplexity, seq-len {cfg.seq_len}, {windows} of each set, BOS by the tokenizer's convention. "
                f"Ratio = share of decoder-layer parameters removed (static) or skipped per token (dynamic, routers' own "
                f"parameters counted; measured on the first evaluation set).")
    if cfg.tasks:
        sample = (f"the first {cfg.task_limit}" if cfg.task_limit else f"a seeded subset (seed {cfg.task_seed}) of {cfg.task_sample}"
                  if cfg.task_sample else "all")
        protocol += f" Zero-shot: lm-eval's builtin tasks, {sample} examples per task, the same for every row."
    if pending:
        protocol += f" Not run yet, {len(pending)} row{'s' * (len(pending) > 1)}: {', '.join(pending)}."
    text = (f"# Comparison on {inputs.model_name}\n\nCalibration and training text: {inputs.data_note}. {protocol}\n\n"
            + table(headers, body) + "\n")
    write_text(out / "comparison.md", text)
    write_json(out / "comparison.json", {"model": inputs.model_name, "config": _jsonable(cfg), "rows": rows,
                                         "pending": pending or []})
    if rows:
        write_scoreboard(build_scoreboard(rows), out / SCOREBOARD_STEM, f"Scoreboard on {inputs.model_name}",
                         f"Calibration and training text: {inputs.data_note}. {protocol}")
    return text


def _jsonable(cfg: CompareConfig) -> dict[str, Any]:
    return {**{k: v for k, v in cfg.__dict__.items() if k != "tune"}, "tune": cfg.tune.to_dict()}
