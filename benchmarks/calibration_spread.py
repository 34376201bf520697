"""Does the ratio a threshold delivers carry over from the calibration text to other text?

    python benchmarks/calibration_spread.py                       # the shipped 25 % set, tail vs spread calibration
    python benchmarks/calibration_spread.py --windows 4 --limit 20   # quicker, noisier

The same routers (their weights fixed) are calibrated to ``--target`` on held-out training text
chosen two ways — its tail (``--calib-sample tail``, the default so far) and whole documents from
across it (``spread``) — and each threshold's ratio is then measured on every evaluation set:
WikiText-2 test, PTB test, C4 documents (from the middle of the sample, in neither calibration
set) and the prompts of zero-shot tasks. The spread of those ratios around the target is what a
user of the threshold gets. Writes a JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from skipgpt.data import bos_token, cut_windows, load_source, tokenize, training_sequences
from skipgpt.evaluation.report import table
from skipgpt.evaluation.zeroshot import evaluate_tasks
from skipgpt.files import write_result
from skipgpt.identity import code_revision
from skipgpt.models import load_model
from skipgpt.routing.save_load import load_routers
from skipgpt.routing.surgery import routing_state
from skipgpt.training.calibrate import achieved_ratio, calibrate_threshold


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--routers", default="smollm2-135m-rt25")
    p.add_argument("--target", type=float, default=0.25)
    p.add_argument("--windows", type=int, default=8, help="1,024-token windows of each perplexity set")
    p.add_argument("--tasks", default="piqa,hellaswag,arc_easy")
    p.add_argument("--limit", type=int, default=100, help="zero-shot examples per task")
    p.add_argument("--out", default="docs/results/calibration_spread_smollm2_rt25")
    args = p.parse_args()
    commit = code_revision()
    model, tokenizer = load_model(args.model)
    load_routers(model, args.routers)
    state = routing_state(model)
    bos = bos_token(tokenizer)
    documents = load_source("c4", "train").documents
    middle = documents[len(documents) * 3 // 8: len(documents) * 5 // 8]  # neither the tail nor the first spread picks
    held_c4 = [d for i, d in enumerate(middle) if i % 4 == 1]
    sets = {
        "wikitext2 test": cut_windows(tokenize(tokenizer, load_source("wikitext2", "test").text()), 1024, bos, args.windows),
        "ptb test": cut_windows(tokenize(tokenizer, load_source("ptb", "test").text()), 1024, bos, args.windows),
        "c4 (middle documents)": cut_windows(tokenize(tokenizer, "\n\n".join(held_c4)), 1024, bos, args.windows),
    }
    rows, result = [], {"model": args.model, "routers": args.routers, "target": args.target, "commit": commit,
                        "windows": args.windows, "tasks": args.tasks, "limit": args.limit, "samples": {}}
    for sample in ("tail", "spread"):
        start = time.perf_counter()
        _, calib = training_sequences(tokenizer, documents, 1024, 4, 1024, sample)
        cal = calibrate_threshold(model, calib, args.target)
        ratios = {name: achieved_ratio(model, ids, "params") for name, ids in sets.items()}
        zs = evaluate_tasks(model, tokenizer, [t for t in args.tasks.split(",") if t], limit=args.limit)
        ratios |= {f"{t} prompts": zs[t]["sparsity"]["param_ratio"] for t in args.tasks.split(",") if t in zs}
        off = [r - args.target for r in ratios.values()]
        result["samples"][sample] = {"threshold": state.config.threshold, "calibration": cal, "ratios": ratios,
                                     "mean_abs_off_target": statistics.fmean(abs(o) for o in off),
                                     "max_abs_off_target": max(abs(o) for o in off), "wall_s": round(time.perf_counter() - start, 1)}
        rows.append([sample, f"{state.config.threshold:.4f}", f"{100 * cal['ratio_after']:.1f}",
                     *(f"{100 * r:.1f}" for r in ratios.values()),
                     f"{100 * result['samples'][sample]['mean_abs_off_target']:.2f}", f"{100 * result['samples'][sample]['max_abs_off_target']:.2f}"])
        names = list(ratios)
    header = ["calibration sample", "threshold", "ratio on it (%)", *(f"{n} (%)" for n in names), "mean |off| (points)", "max |off| (points)"]
    text = table(header, rows)
    print(text)
    write_result(args.out, result,
        f"# Does the calibrated ratio carry over?\n\n{args.model} + `{args.routers}` calibrated to {args.target:.0%} of the "
        f"routable parameters on 4 x 1,024 held-out C4 tokens taken two ways; ratio then measured on {args.windows} windows "
        f"of each perplexity set and the prompts of the first {args.limit} examples of each task. Commit {commit}; "
        f"`python benchmarks/calibration_spread.py`.\n\n{text}\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
