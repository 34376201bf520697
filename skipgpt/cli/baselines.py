"""``skipgpt prune`` (one static baseline) and ``skipgpt compare`` (all of them beside SkipGPT)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..baselines import PLAN_NAME, get_method, save_pruned
from ..baselines.compare import CompareConfig, Inputs, run_compare
from ..config import TuneConfig
from ..data import load_source
from ..errors import SkipGPTError
from ..evaluation import zeroshot_tasks
from ..evaluation.report import pct, table
from ..lock import output_lock
from ..routing.save_load import read_router_config
from .common import (
    data_dir_arg,
    default_train_data,
    load_from_args,
    model_args,
)
from .train import calibration_and_training


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="a static baseline: remove layers, modules or width on calibration text")
    model_args(p)
    data_dir_arg(p)
    p.add_argument("--method", required=True, help="shortgpt, joint-layer-drop, shortened-ppl, shortened-taylor, laco, slicegpt, llm-pruner")
    p.add_argument("--ratio", type=float, required=True, help="share of decoder-layer parameters to remove, in [0, 1)")
    p.add_argument("--data", default=None, help="calibration text, as tune's --data (its held-out tail is used)")
    p.add_argument("--calib-sequences", type=int, default=CompareConfig.calib_sequences)
    p.add_argument("--calib-seq-len", type=int, default=CompareConfig.calib_seq_len)
    p.add_argument("--out", required=True)
    p.set_defaults(handler=cmd_prune)

    p = sub.add_parser("compare", help="baselines and SkipGPT side by side at matched ratios, one protocol, one table")
    model_args(p)
    data_dir_arg(p)
    p.add_argument("--ratio", default="0.25", help="comma-separated parameter ratios, e.g. 0.25,0.4")
    p.add_argument("--methods", default="all", help="all or a comma-separated list (see 'skipgpt prune --method' and skipgpt-rt, mod-d, d-llm)")
    p.add_argument("--data", default=None, help="calibration and training text, as tune's --data")
    p.add_argument("--eval", default="wikitext2,ptb", help="comma-separated evaluation sets or files, as eval's --data")
    p.add_argument("--seq-len", type=int, default=CompareConfig.seq_len, help="evaluation window")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows of each set")
    p.add_argument("--calib-sequences", type=int, default=CompareConfig.calib_sequences)
    p.add_argument("--calib-seq-len", type=int, default=CompareConfig.calib_seq_len)
    p.add_argument("--steps", type=int, default=TuneConfig.steps, help="router-tuning steps for every dynamic method")
    p.add_argument("--loss", choices=["nll", "kl"], default=TuneConfig.loss)
    p.add_argument("--lora-steps", type=int, default=0,
                   help="> 0: the LoRA rows, each with this many steps: dense + LoRA, SkipGPT-RT-L over every SkipGPT-RT row "
                        "and router set, SkipGPT-Joint, and the --lora-static best static methods of each ratio + LoRA")
    p.add_argument("--lora-static", type=int, default=CompareConfig.lora_static,
                   help="with --lora-steps: how many static methods per ratio get a LoRA row, lowest perplexity on the "
                        "first --eval set first (default: %(default)s)")
    p.add_argument("--lora-lr", type=float, default=CompareConfig.lora_lr,
                   help="with --lora-steps: every LoRA row's learning rate (default: the paper's %(default)g)")
    p.add_argument("--lora-bf16", action="store_true", help="with --lora-steps: every LoRA row under bf16 autocast")
    p.add_argument("--lora-train-replacements", action="store_true",
                   help="with --lora-steps: RT-L rows also train the replacements of skipped modules")
    p.add_argument("--router-set", action="append", default=[], metavar="LABEL=ROUTERS",
                   help="a trained router set (builtin name or directory) scored as a row, e.g. "
                        "'SkipGPT-RT (shipped 25 %%)=smollm2-135m-rt25'; repeatable")
    p.add_argument("--tasks", default="", help="zero-shot tasks for every row too (lm-eval; as eval's --tasks)")
    p.add_argument("--limit", type=int, default=None, help="--tasks: first N examples of each task")
    p.add_argument("--sample", type=int, default=None,
                   help="--tasks: a seeded subset of N examples of each task, the same for every row (instead of --limit)")
    p.add_argument("--sample-seed", type=int, default=CompareConfig.task_seed, help="--sample's seed (default: %(default)s)")
    p.add_argument("--no-dense", action="store_true", help="leave out the dense reference row")
    p.add_argument("--report-only", action="store_true", help="write the table from finished rows; run nothing")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=cmd_compare)


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    method = get_method(args.method)
    if not 0.0 <= args.ratio < 1.0:
        raise SkipGPTError(f"--ratio must be in [0, 1), got {args.ratio}")
    out = Path(args.out)
    if (out / PLAN_NAME).exists():
        raise SkipGPTError(f"{out} already holds a pruned model; pick another --out or delete it")
    model, tokenizer = load_from_args(args)
    source, _, calib_ids = calibration_and_training(args, tokenizer, TuneConfig.seq_len)
    plan = method.prune(model, calib_ids, args.ratio)
    plan.extra["calibration"] = f"{calib_ids.shape[0]} x {calib_ids.shape[1]} held-out tokens of {source.description}"
    save_pruned(model, plan, out)
    print(table(["field", "value"], [("method", plan.method), ("target ratio", pct(plan.target_ratio)),
                                     ("achieved ratio", pct(plan.achieved_ratio)), ("modules removed", len(plan.removed)),
                                     ("saved", str(out))]))
    return plan.to_dict()


def _nothing_runs() -> torch.nn.Module:
    raise AssertionError("--report-only runs no row")


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    ratios = tuple(float(r) for r in args.ratio.split(",") if r)
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise SkipGPTError(f"--ratio takes ratios in (0, 1), comma-separated; got {args.ratio!r}")
    if args.limit is not None and args.sample is not None:
        raise SkipGPTError("--limit takes the first N examples and --sample a seeded subset of N: give one of them")
    router_sets = []
    for item in args.router_set:
        label, sep, spec = item.rpartition("=")
        if not sep or not label or not spec:
            raise SkipGPTError(f"--router-set takes LABEL=ROUTERS (a builtin name or directory), got {item!r}")
        read_router_config(spec)  # a wrong name fails before any model is loaded
        router_sets.append((label, spec))
    specs = [s for s in args.eval.split(",") if s]
    texts = {spec: load_source(spec, "test", args.data_dir).text() for spec in specs}
    cfg = CompareConfig(ratios=ratios, methods=tuple(m for m in args.methods.split(",") if m), eval_specs=tuple(specs),
                        seq_len=args.seq_len, max_windows=args.max_windows, calib_sequences=args.calib_sequences,
                        calib_seq_len=args.calib_seq_len, tune=TuneConfig(steps=args.steps, loss=args.loss),
                        lora_steps=args.lora_steps, lora_static=args.lora_static, lora_lr=args.lora_lr,
                        lora_bf16=args.lora_bf16, lora_train_replacements=args.lora_train_replacements,
                        include_dense=not args.no_dense,
                        tasks=tuple(t for t in args.tasks.split(",") if t), task_limit=args.limit,
                        task_sample=args.sample, task_seed=args.sample_seed, router_sets=tuple(router_sets),
                        report_only=args.report_only, command=args.command_line)
    cfg.resolved_methods()  # unknown names and missing task files fail before any model is loaded
    if cfg.tasks:
        zeroshot_tasks.find_task_files(list(cfg.tasks), args.data_dir)
    with output_lock(Path(args.out), "skipgpt compare"):  # finished rows stay whatever fails later
        if args.report_only:  # only the finished rows are read: no model, no tokenized text
            inputs = Inputs(fresh_model=_nothing_runs, tokenizer=None, train_ids=torch.empty(0), calib_ids=torch.empty(0),
                            eval_texts=texts, data_note=load_source(args.data or default_train_data(args), "train", args.data_dir).description,
                            model_name=args.model, data_dir=args.data_dir)
        else:
            model, tokenizer = load_from_args(args)
            source, train_ids, calib_ids = calibration_and_training(args, tokenizer, cfg.tune.seq_len)
            del model
            inputs = Inputs(
                fresh_model=lambda: load_from_args(args)[0],
                tokenizer=tokenizer, train_ids=train_ids, calib_ids=calib_ids, eval_texts=texts,
                data_note=source.description, model_name=args.model, data_dir=args.data_dir,
            )
        rows = run_compare(inputs, cfg, Path(args.out))
    print((Path(args.out) / "comparison.md").read_text())
    return {"rows": rows}
