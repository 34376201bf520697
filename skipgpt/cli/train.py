"""``skipgpt tune`` (stage 1), ``finetune`` (stage 2) and ``calibrate`` (re-target a trained set)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..baselines.compare import CompareConfig, split_training_text
from ..config import RouterConfig, TuneConfig, check_target
from ..data import CALIB_SAMPLES, bos_token, cut_windows, load_source, tokenize, training_sequences
from ..errors import SkipGPTError
from ..evaluation.report import pct, table
from ..routing.adapters import get_adapter
from ..routing.save_load import CONFIG_NAME, load_routers
from ..routing.surgery import attach_routers
from ..training.calibrate import TOLERANCE, recalibrate
from ..training.finetune import FinetuneConfig, copy_adapter, finetune
from ..training.tune import tune_routers
from .common import (
    check_output,
    data_dir_arg,
    default_train_data,
    load_from_args,
    model_args,
    routed_model,
    strict_arg,
    tune_args,
    tune_config,
    writing,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="stage 1: train routers with the base model frozen")
    model_args(p)
    data_dir_arg(p)
    p.add_argument("--data", default=None, help="training text: c4, ptb, pydoc, a .txt/.jsonl file or hf:NAME (default: c4 if a data dir is set, else pydoc)")
    tune_args(p, TuneConfig.steps)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(handler=cmd_tune)

    p = sub.add_parser("finetune", help="stage 2: LoRA with frozen routers (SkipGPT-RT-L), --joint or --dense")
    model_args(p)
    data_dir_arg(p)
    p.add_argument("--data", default=None, help="training text, as for tune")
    p.add_argument("--routers", help="router directory from 'skipgpt tune' (SkipGPT-RT-L)")
    strict_arg(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--joint", action="store_true", help="SkipGPT-Joint: fresh routers and LoRA trained together")
    mode.add_argument("--dense", action="store_true", help="Dense + LoRA: the same recipe without routers")
    f = FinetuneConfig()
    p.add_argument("--steps", type=int, default=f.steps)
    p.add_argument("--seq-len", type=int, default=f.seq_len)
    p.add_argument("--batch-size", type=int, default=f.batch_size)
    p.add_argument("--grad-accum", type=int, default=f.grad_accum)
    p.add_argument("--lr", type=float, default=f.lr)
    p.add_argument("--warmup-ratio", type=float, default=f.warmup_ratio)
    p.add_argument("--loss", choices=["nll", "kl"], default=f.loss, help="LM loss (paper) or KL to the base model")
    p.add_argument("--lora-r", type=int, default=f.lora_r)
    p.add_argument("--lora-alpha", type=int, default=f.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=f.lora_dropout)
    p.add_argument("--lora-targets", default=",".join(f.lora_targets), help="comma-separated module names")
    p.add_argument("--train-replacements", action="store_true",
                   help="RT-L: also train what skipped modules leave behind (the skip decisions stay frozen)")
    p.add_argument("--target", type=float, default=None,
                   help=f"--joint: target sparsity (default {f.joint.target}); RT-L: the ratio its threshold is re-set to after "
                        "training (default: what the stage-1 routers delivered on the calibration text before LoRA)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="keep the threshold the routers had: LoRA moves the hidden states they read, so the ratio moves too")
    p.add_argument("--target-unit", choices=["params", "modules"], default=f.joint.target_unit, help="--joint")
    p.add_argument("--router-lr", type=float, default=f.joint.lr, help="--joint: router learning rate")
    p.add_argument("--seed", type=int, default=f.seed)
    p.add_argument("--save-every", type=int, default=f.save_every)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast: about 1.5 x the steps per minute on a CPU with "
                   "AVX-512 BF16 (measure yours); weights and routing decisions stay float32")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(handler=cmd_finetune)

    p = sub.add_parser("calibrate", help="re-target trained routers: set their threshold for another ratio, no training")
    model_args(p)
    data_dir_arg(p)
    p.add_argument("--routers", required=True, help="router directory from 'skipgpt tune'")
    strict_arg(p)
    p.add_argument("--adapter", help="LoRA adapter from 'skipgpt finetune': set the threshold for the fine-tuned model, whose "
                                     "hidden states the LoRA moved (the adapter is copied to --out beside the routers)")
    p.add_argument("--target", type=float, required=True, help="ratio argmax routing should deliver, in [0, 1)")
    p.add_argument("--target-unit", choices=["params", "modules"], default=TuneConfig.target_unit)
    p.add_argument("--data", default=None, help="calibration text, as tune's --data (default: the training text)")
    p.add_argument("--calib-sample", choices=CALIB_SAMPLES, default=TuneConfig.calib_sample,
                   help="with --split train: the held-out tail of the training text, or documents from across it (spread)")
    p.add_argument("--split", default="train",
                   help="train: the held-out tail of the training text, as tune calibrates; valid: the start of a named "
                        "set's validation split (in-domain calibration, e.g. --data wikitext2 --split valid)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="stop once the calibration text's ratio is this close to --target (the bisection's resolution; "
                        "the ratio on other text moves by more than this anyway)")
    p.add_argument("--out", required=True, help="new router directory (the input one is left as it is)")
    p.set_defaults(handler=cmd_calibrate)


def run_tune(args: argparse.Namespace, data: str) -> dict[str, Any]:
    """Validate everything first, so bad input never leaves a half-made output directory."""
    tune_cfg, router_cfg = tune_config(args)
    out = Path(args.out)
    with writing(out, args):
        check_output(out, args.resume)
        source = load_source(data, "train", args.data_dir)
        model, tokenizer = load_from_args(args)
        get_adapter(model)
        train_ids, calib_ids = training_sequences(tokenizer, source.documents, tune_cfg.seq_len, tune_cfg.calib_sequences,
                                                  tune_cfg.calib_seq_len, tune_cfg.calib_sample)
        print(f"skipgpt: tuning routers on {source.description}: {train_ids.shape[0]} sequences of {tune_cfg.seq_len} tokens"
              f"{'' if calib_ids is None else f', {calib_ids.numel()} held-out tokens for calibration'}", file=sys.stderr)
        return tune_routers(
            model, train_ids, tune_cfg, out, router_config=router_cfg, calib_ids=calib_ids, resume=args.resume,
            meta={"model": args.model, "data": source.description, "command": args.command_line},
        )


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    results = run_tune(args, default_train_data(args))
    cal = results["calibration"] or {}
    print(table(["field", "value"], [
        ("routers", args.out), ("tokens trained", results["tokens_trained"]), ("wall time", f"{results['wall_s']:.0f} s"),
        ("argmax ratio before calibration", pct(cal.get("ratio_before"))), ("after calibration", pct(cal.get("ratio_after"))),
    ]))
    return results


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    mode = "joint" if args.joint else "dense" if args.dense else "routed"
    if (mode == "routed") != bool(args.routers):
        raise SkipGPTError("SkipGPT-RT-L needs --routers DIR; --joint trains fresh routers and --dense has none, so they take no --routers")
    base = TuneConfig()
    cfg = FinetuneConfig(
        mode=mode, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        lr=args.lr, warmup_ratio=args.warmup_ratio, loss=args.loss, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
        seed=args.seed, save_every=args.save_every, train_replacements=args.train_replacements, bf16=args.bf16,
        calibrate=not args.no_calibrate, target=args.target if mode == "routed" else None,
        joint=TuneConfig.from_dict({**base.to_dict(), "target": base.target if args.target is None else args.target,
                                    "target_unit": args.target_unit,
                                    "lr": args.router_lr, "steps": args.steps, "seed": args.seed}),
    )
    out = Path(args.out)
    with writing(out, args):
        check_output(out, args.resume)
        source = load_source(default_train_data(args), "train", args.data_dir)
        model, tokenizer = load_from_args(args)
        if args.routers:
            load_routers(model, args.routers, strict=args.strict)
        elif args.joint:
            attach_routers(model, RouterConfig())
        # The same split as 'tune': every mode trains on the same text, joint calibrates on the held-out tail.
        train_ids, calib_ids = training_sequences(tokenizer, source.documents, cfg.seq_len, base.calib_sequences, base.calib_seq_len)
        _, results = finetune(model, train_ids, cfg, out, resume=args.resume, calib_ids=calib_ids,
                              meta={"model": args.model, "routers": args.routers, "data": source.description})
    rows = [("result", results["stage"]), ("adapter", args.out), ("tokens trained", results["tokens_trained"]),
            ("wall time", f"{results['wall_s']:.0f} s")]
    cal = results["calibration"]
    if cal and "ratio_stage1" in cal:
        rows += [("ratio before LoRA (calibration text)", pct(cal["ratio_stage1"])),
                 ("after LoRA, stage-1 threshold", pct(cal["ratio_before"])), ("after re-calibration", pct(cal["ratio_after"]))]
    print(table(["field", "value"], rows))
    return results


def calibration_and_training(args: argparse.Namespace, tokenizer: Any, seq_len: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    source = load_source(args.data or default_train_data(args), "train", args.data_dir)
    cfg = CompareConfig(calib_sequences=args.calib_sequences, calib_seq_len=args.calib_seq_len,
                        tune=TuneConfig(seq_len=seq_len))
    train_ids, calib_ids = split_training_text(tokenizer, source.documents, cfg)
    return source, train_ids, calib_ids


def cmd_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    check_target(args.target)
    if not 0 < args.tolerance <= 0.1:
        raise SkipGPTError(f"--tolerance {args.tolerance} is outside (0, 0.1]: it is how close to --target the "
                           "calibration text's ratio must get, e.g. 0.001")
    out = Path(args.out)
    if (out / CONFIG_NAME).exists():
        raise SkipGPTError(f"{out} already holds routers; pick another --out")
    source = load_source(args.data or default_train_data(args), args.split, args.data_dir)
    model, tokenizer = routed_model(args)
    cfg = TuneConfig()
    if args.split == "train":
        _, calib_ids = training_sequences(tokenizer, source.documents, cfg.seq_len, cfg.calib_sequences, cfg.calib_seq_len,
                                          args.calib_sample)
    else:  # text never trained on: its first windows
        calib_ids = cut_windows(tokenize(tokenizer, source.text()), cfg.calib_seq_len, bos_token(tokenizer), cfg.calib_sequences)
        calib_ids = calib_ids if calib_ids.shape[0] == cfg.calib_sequences else None
    if calib_ids is None:
        raise SkipGPTError(f"{source.description} is too short to hold out {cfg.calib_sequences} x {cfg.calib_seq_len} calibration tokens")
    result = recalibrate(model, args.routers, calib_ids, args.target, args.target_unit, out,
                         note=f"{calib_ids.numel()} tokens of {source.description} ({args.split} split)"
                              + (f", with the LoRA adapter of {args.adapter}" if args.adapter else ""),
                         command=args.command_line, tol=args.tolerance)
    if args.adapter:
        copy_adapter(args.adapter, out)
    print(table(["field", "value"], [("routers", str(out)), ("ratio before", pct(result["ratio_before"])),
                                     ("ratio after", pct(result["ratio_after"])), ("threshold", f"{result['threshold']:.4g}")]))
    return result
