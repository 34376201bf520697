"""``skipgpt info`` (what a model offers to route) and ``skipgpt demo`` (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import RouterConfig
from ..data import data_dir
from ..errors import SkipGPTError
from ..evaluation.perplexity import evaluate_sets
from ..evaluation.report import pct, ppl_rows, table
from ..files import write_json
from ..inference.cost import BYTE_COLUMNS, FLOP_COLUMNS, PARTS, RoutingCeiling, routing_ceiling
from ..routing.save_load import load_routers
from ..routing.surgery import describe_model, detach_routers, has_routers, routing_state
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
    p = sub.add_parser("info", help="architecture, layers, routable modules and their parameter counts, and the "
                                    "most that routing can gain on the model (its ceiling)")
    model_args(p)
    g = p.add_argument_group("ceiling", "the routers the ceiling assumes (default: the model's own, if it has "
                                        "routers, else the tuning defaults)")
    g.add_argument("--router", choices=["linear", "mlp"], default=None)
    g.add_argument("--replacement", choices=["none", "bias", "lowrank"], default=None)
    g.add_argument("--replacement-rank", type=int, default=None)
    g.add_argument("--kv-policy", choices=["keep", "drop"], default=None)
    g.add_argument("--context", type=int, default=1024,
                   help="tokens of a prefill / scoring window, and keys a decoding step sees (default %(default)s)")
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
    if args.context < 1:
        raise SkipGPTError(f"--context must be at least 1 token, got {args.context}")
    model, _ = load_from_args(args, device="cpu", device_map=None)
    info: dict[str, Any] = {"model": args.model, **describe_model(model)}
    print(table(["field", "value"], list(info.items())))
    base = routing_state(model).config.to_dict() if has_routers(model) else {}
    chosen = {k: v for k in ("router", "replacement", "replacement_rank", "kv_policy")
              if (v := getattr(args, k)) is not None}
    if chosen.get("replacement") == "lowrank" and "replacement_rank" not in chosen and not base.get("replacement_rank"):
        chosen["replacement_rank"] = RouterConfig.replacement_rank
    router = RouterConfig(**{**base, **chosen})
    ceiling = routing_ceiling(model.config, router, context=args.context,
                              bytes_per_param=model.get_input_embeddings().weight.element_size())
    print()
    print(ceiling_report(ceiling))
    info["ceiling"] = ceiling.to_dict()
    return info


def _amount(x: float, unit: str) -> str:
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def ceiling_report(c: RoutingCeiling) -> str:
    """The ceiling as ``skipgpt info`` prints it: a table, what it assumes, and a warning line
    when routing can skip little of the model."""
    n = f"{c.context:,}"
    columns = [*FLOP_COLUMNS, *BYTE_COLUMNS]
    headers = ["share of", f"prefill {n} (FLOPs)", f"score {n} (FLOPs)", "decode step (FLOPs)",
               "decode step (bytes read)", "weights (bytes)"]
    names = {"attention": "attention", "mlp": "MLP", "embeddings": "embeddings",
             "lm_head": "LM head" + (" (tied)" if c.tied_embeddings else ""),
             "routers": f"routers ({c.router}) + replacements"}
    rows: list[list[Any]] = [[names[p], *(pct(c.parts[k][p] / c.total(k)) for k in columns)] for p in PARTS]
    rows.append(["total, per token", *(_amount(c.total(k), "FLOP") for k in FLOP_COLUMNS),
                 *(_amount(c.total(k), "B") for k in BYTE_COLUMNS)])
    rows.append(["routable (attention + MLP)", *(pct(c.routable_share(k)) for k in columns)])
    rows.append([f"skippable (KV policy {c.kv_policy})", *(pct(c.skippable_share(k)) for k in columns)])
    for r in c.ratios:
        speedups = (f"{c.speedup[k][f'{r:g}']:.2f} ×" for k in columns[:-1])  # nothing for weights stored
        rows.append([f"ideal speedup, {100 * r:.0f} % skipped", *speedups, ""])
    replacement = c.replacement + (f" (rank {c.replacement_rank})" if c.replacement == "lowrank" else "")
    notes = [
        f"Routing ceiling, from the config: routers {c.router}, replacement {replacement}, KV policy {c.kv_policy}, "
        f"{c.bytes_per_param:g} bytes a weight (routers and replacements: 4, float32).",
        table(headers, rows),
        "prefill: logits at the last position (generation); score: logits at every position (perplexity). "
        "Skipped: that share of every attention and MLP module's tokens, so of the routable parameters.",
        "FLOP speedups: plain model / routed model, routers and replacements included. Decode bytes: batch 1, "
        "which is weight-bandwidth bound and reads no weights of a skipped module (in a batch, a module's "
        "weights are read if any token executes it); the KV cache counts under attention. Replacements: "
        "stored, and run for skipped modules only.",
    ]
    warning = c.warning()
    return "\n".join(notes + ([warning] if warning else []))


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
