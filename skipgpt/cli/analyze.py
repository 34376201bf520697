"""``skipgpt analyze KIND``: the paper's routing analyses as figures with their JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data import load_source
from ..errors import SkipGPTError
from .common import (
    data_dir_arg,
    load_from_args,
    model_args,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="the paper's routing analyses as figures (PNG) with the JSON behind them")
    p.add_argument("kind", choices=ANALYSES, help="cosine (fig. 2), routing, sparsity-split (fig. 5), context-shift (fig. 6), ppl-curve (fig. 7), learning-curve (PPL against training tokens)")
    model_args(p)
    data_dir_arg(p)
    p.add_argument("--routers", help="router directory; sparsity-split: comma-separated directories (cosine uses none)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", help="the text to analyse")
    text.add_argument("--text-file", help="read the text from this file")
    text.add_argument("--data", help="a named set (wikitext2, ptb, pydoc) or data file, as for eval")
    p.add_argument("--split", default="test", help="split of --data (default: %(default)s)")
    p.add_argument("--offset", type=int, default=0, help="skip this many tokens of the text first")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: 48 for cosine/routing, 1024 otherwise)")
    p.add_argument("--num-seqs", type=int, default=4, help="sparsity-split, context-shift: consecutive sequences of the text (default: %(default)s)")
    p.add_argument("--window", type=int, default=100, help="context-shift: sliding window in tokens (default: %(default)s)")
    p.add_argument("--results", help="ppl-curve, learning-curve: comma-separated result JSON files, each optionally LABEL=FILE")
    p.add_argument("--dataset", default="wikitext2", help="ppl-curve, learning-curve: which data set's perplexity (default: %(default)s)")
    p.add_argument("--methods", help="ppl-curve: draw only these methods, comma-separated (dense is always kept)")
    p.add_argument("--out", required=True, help="directory for the figure (and the JSON unless --json)")
    p.add_argument("--name", help="file name stem (default: analysis_KIND)")
    p.add_argument("--json", help="write the JSON here instead of OUT/NAME.json")
    p.set_defaults(handler=cmd_analyze)


ANALYSES = ("cosine", "routing", "sparsity-split", "context-shift", "ppl-curve", "learning-curve")


def _analysis_text(args: argparse.Namespace) -> tuple[str, str]:
    """(text, description) from --text, --text-file or --data."""
    if args.text is not None:
        return args.text, "given text"
    if args.text_file:
        try:
            return Path(args.text_file).read_text(), str(args.text_file)
        except (OSError, UnicodeDecodeError) as err:
            raise SkipGPTError(f"cannot read --text-file: {err}") from None
    if args.data:
        source = load_source(args.data, args.split, args.data_dir)
        return source.text(), source.description
    raise SkipGPTError(f"{args.kind} needs text: --text STR, --text-file FILE or --data NAME")


def cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from ..evaluation import figures  # matplotlib only when analysing

    out_dir = Path(args.out)
    stem = args.name or f"analysis_{args.kind.replace('-', '_')}"
    png, json_path = out_dir / f"{stem}.png", Path(args.json) if args.json else out_dir / f"{stem}.json"
    if args.kind in ("ppl-curve", "learning-curve"):
        if not args.results:
            raise SkipGPTError(f"{args.kind} needs --results FILE[,FILE...] (JSON from 'skipgpt eval --json' or rows)")
        specs = [s for s in args.results.split(",") if s]
        result = (figures.ppl_curve(specs, args.dataset, [m for m in (args.methods or "").split(",") if m] or None)
                  if args.kind == "ppl-curve" else figures.learning_curve(specs, args.dataset))
        result["model"] = args.model
    else:
        router_dirs = [d for d in (args.routers or "").split(",") if d]
        figures.check_router_sets(args.kind, router_dirs, carries_routers=(Path(args.model) / "router_config.json").is_file())
        text, description = _analysis_text(args)
        load = lambda: load_from_args(args)  # noqa: E731
        result = figures.routed_analysis(
            args.kind, args.model, load, router_dirs, text, description,
            seq_len=args.seq_len or (48 if args.kind in ("cosine", "routing") else 1024),
            num_seqs=1 if args.kind in ("cosine", "routing") else args.num_seqs, offset=args.offset, window=args.window)
    figures.write_figure(args.kind, result, png, json_path)
    print(f"skipgpt: figure {png}\nskipgpt: data   {json_path}")
    return result
