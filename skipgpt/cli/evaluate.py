"""``skipgpt eval``: perplexity and zero-shot accuracy of a dense, routed, LoRA or pruned model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data import load_source
from ..errors import SkipGPTError
from ..evaluation import zeroshot, zeroshot_tasks
from ..evaluation.perplexity import evaluate_sets
from ..evaluation.report import ppl_rows
from ..files import write_json
from ..routing.surgery import has_routers
from .common import (
    data_dir_arg,
    model_args,
    routed_model,
    strict_arg,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy, dense or routed, with sparsity statistics")
    model_args(p)
    data_dir_arg(p)
    strict_arg(p)
    p.add_argument("--routers", help="router directory from 'skipgpt tune' (omit for the dense model)")
    p.add_argument("--adapter", help="LoRA adapter directory from 'skipgpt finetune'")
    p.add_argument("--pruned", help="pruned-model directory from 'skipgpt prune' or 'skipgpt compare'")
    p.add_argument("--data", default=None,
                   help="comma-separated: wikitext2, ptb, pydoc or file paths (default: wikitext2, or none when --tasks is given)")
    p.add_argument("--tasks", help="zero-shot tasks through lm-evaluation-harness, comma-separated or 'all': "
                                   "boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa (docs/zeroshot.md)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: the first N examples of each task")
    p.add_argument("--sample", type=int, default=None,
                   help="zero-shot: a seeded subset of N examples of each task, the same for every model (instead of --limit)")
    p.add_argument("--sample-seed", type=int, default=0, help="zero-shot: seed of --sample's subset (default: %(default)s)")
    p.add_argument("--zeroshot-batch-size", type=int, default=8, help="zero-shot: requests per forward (default: %(default)s)")
    p.add_argument("--split", default="test")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--json", help="write results here")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    data = args.data if args.data is not None else ("" if args.tasks else "wikitext2")
    specs = [s for s in data.split(",") if s]
    for spec in specs:  # fail on bad data before spending time on the model
        load_source(spec, args.split, args.data_dir)
    tasks = zeroshot_tasks.resolve_tasks(args.tasks) if args.tasks else []
    if tasks:
        zeroshot_tasks.find_task_files(tasks, args.data_dir)
    if args.limit is not None and args.sample is not None:
        raise SkipGPTError("--limit takes the first N examples and --sample a seeded subset of N: give one of them")
    if not specs and not tasks:
        raise SkipGPTError("nothing to evaluate: give --data (perplexity) and/or --tasks (zero-shot accuracy)")
    model, tokenizer = routed_model(args)
    label = ("routed" if has_routers(model) else "pruned" if args.pruned else "dense") + (" + LoRA" if args.adapter else "")
    rows = evaluate_sets(model, tokenizer, specs, split=args.split, data_dir=args.data_dir, seq_len=args.seq_len,
                     batch_size=args.batch_size, max_windows=args.max_windows, label=label)
    if rows:
        print(ppl_rows(rows))
    results = {"model": args.model, "routers": args.routers, "adapter": args.adapter, "pruned": args.pruned, "results": {spec: r for spec, (_, r) in zip(specs, rows)}}
    if tasks:
        zs = zeroshot.evaluate_tasks(model, tokenizer, tasks, limit=args.limit, sample=args.sample, sample_seed=args.sample_seed,
                                     data_dir=args.data_dir, batch_size=args.zeroshot_batch_size)
        print(zeroshot.report(zs, label))
        results["results"]["zeroshot"] = zs
    if args.json:
        write_json(Path(args.json), results)
    return results
