"""``skipgpt info`` (what a model offers to route) and ``skipgpt demo`` (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from ..data import data_dir
from ..evaluation.perplexity import evaluate_sets
from ..evaluation.report import pct, ppl_rows, table
from ..files import write_json
from ..routing.save_load import load_routers
from ..routing.surgery import describe_model, detach_routers
from ..training import checkpoint
from ..training.tune import RESULTS_NAME
from .common import (
    data_dir_arg,
    load_from_args,
    model_args,
    tune_args,
)
from .train import run_tune


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architecture, layers, routable modules and their parameter counts")
    model_args(p)
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("demo", help="tune routers on the default model and compare with dense (what 'make demo' runs)")
    model_args(p)
    data_dir_arg(p)
    tune_args(p, 70)
    p.add_argument("--eval-windows", type=int, default=40,
                   help="evaluate the first N windows of 1024 tokens (default %(default)s; 0 = the whole test set)")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(handler=cmd_demo)


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    model, _ = load_from_args(args, device="cpu", device_map=None)
    info = {"model": args.model, **describe_model(model)}
    print(table(["field", "value"], list(info.items())))
    return info


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Tune on the default model, then dense vs routed perplexity on held-out text."""
    start = time.perf_counter()
    has_data = data_dir(args.data_dir) is not None
    train, evals = ("c4", ["wikitext2"]) if has_data else ("pydoc", ["pydoc"])
    out = Path(args.out)
    if (out / RESULTS_NAME).exists():  # a finished demo starts over; an interrupted one resumes
        shutil.rmtree(out)
    args.resume = checkpoint.find(out) is not None
    tuned = run_tune(args, train)
    model, tokenizer = load_from_args(args)
    evaluate = lambda label: evaluate_sets(  # noqa: E731
        model, tokenizer, evals, split="test", data_dir=args.data_dir, seq_len=1024, batch_size=1,
        max_windows=args.eval_windows or None, label=label)
    rows = evaluate("dense")
    load_routers(model, out)
    rows += evaluate("SkipGPT-RT")
    detach_routers(model)
    print()
    print(f"Model: {args.model}   trained on: {tuned['data']}   evaluated on: {', '.join(r['data'] for _, r in rows[: len(evals)])}")
    print(f"Router tuning: {tuned['tokens_trained']:,} tokens, {tuned['wall_s']:.0f} s; target {pct(args.target)} ({args.target_unit}); "
          f"argmax ratio on held-out training text {pct((tuned['calibration'] or {}).get('ratio_before'))} before threshold calibration, "
          f"{pct((tuned['calibration'] or {}).get('ratio_after'))} after")
    print(ppl_rows(rows))
    summary = {"tune": tuned, "eval": {label: r for label, r in rows}, "total_wall_s": time.perf_counter() - start}
    write_json(out / "demo.json", summary)
    (out / "demo.md").write_text(ppl_rows(rows) + "\n")
    print(f"\nresults: {out / 'demo.json'}, {out / 'demo.md'}; total {summary['total_wall_s']:.0f} s")
    return summary
