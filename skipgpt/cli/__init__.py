"""Command line: ``skipgpt info | tune | finetune | calibrate | eval | generate | export | prune |
compare | analyze | demo`` (also ``python -m skipgpt``).

One module per command group, each holding its options next to its handlers; the handlers parse
options and call the stage modules (routing, training, inference, evaluation, baselines).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from ..allocator import keep_freed_memory
from ..errors import SkipGPTError
from . import analyze, baselines, evaluate, export, generate, info, train
from .common import resolve_model

GROUPS = (info, train, evaluate, generate, export, baselines, analyze)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skipgpt", description="Per-token module skipping (SkipGPT) for HF decoder LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["skipgpt", *argv])  # recorded with results: how they were made
    keep_freed_memory()  # this process is ours: big per-step tensors reuse memory instead of faulting it in
    try:
        resolve_model(args)
        args.handler(args)
    except SkipGPTError as err:
        print(f"skipgpt: error: {err}", file=sys.stderr)
        return 2
    return 0
