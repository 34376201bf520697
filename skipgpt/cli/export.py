"""``skipgpt export``: one self-contained model directory (LoRA merged, routers beside)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..devices import DTYPE_CHOICES
from ..inference.export import export_model
from ..lock import output_lock
from ..models import DEFAULT_MODEL


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="one self-contained directory: weights (LoRA merged) + routers")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--routers", help="router directory")
    p.add_argument("--adapter", help="LoRA adapter directory from 'skipgpt finetune'")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype of the written weights (default: the checkpoint's own, on every device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the LoRA merge runs")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    with output_lock(Path(args.out), "skipgpt export"):
        out = export_model(args.model, args.out, routers=args.routers, adapter=args.adapter, dtype=args.dtype,
                           device=args.device)
    print(f"exported to {out}: load it with skipgpt.models.load_model({str(out)!r}) or 'skipgpt eval --model {out}'; "
          "plain transformers loads it as the dense model")
    return {"out": str(out)}
