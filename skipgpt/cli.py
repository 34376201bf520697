"""Command line: ``skipgpt info | tune | finetune | export | eval | generate | demo | analyze`` (also ``python -m skipgpt``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import checkpoint
from .adapters import get_adapter
from .calibrate import calibrate_threshold
from .config import RouterConfig, TuneConfig
from .data import DATA_DIR_ENV, data_dir, load_source, training_sequences
from .errors import SkipGPTError
from .evaluate import perplexity
from .models import DEFAULT_MODEL, load_model
from .report import pct, ppl_rows, table
from .export import export_model
from .finetune import FinetuneConfig, finetune, load_adapter
from .baselines import get_method, load_pruned, save_pruned
from .baselines.compare import CompareConfig, Inputs, run_compare, split_training_text
from .baselines.structure import PLAN_NAME
from .generate import GenerateConfig, generate
from .speculative import parse_draft_tokens
from .surgery import (
    CONFIG_NAME,
    attach_routers,
    branch_parameter_counts,
    detach_routers,
    has_routers,
    load_routers,
    read_router_config,
    routing_state,
    save_routers,
    write_json,
)
from .tune import RESULTS_NAME, tune_routers
from . import zeroshot

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="builtin name, local HF dir, .gguf file or hub id (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help=f"directory holding the named data sets (default: ${DATA_DIR_ENV})")


def _tune_args(p: argparse.ArgumentParser, steps: int) -> None:
    d = TuneConfig()
    p.add_argument("--target", type=float, default=d.target, help="target sparsity in [0, 1)")
    p.add_argument("--target-unit", choices=["params", "modules"], default=d.target_unit)
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="size --steps to this many minutes of tuning + calibration on this machine (timed by a short probe)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of the sparsity loss")
    p.add_argument("--loss", choices=["nll", "kl"], default=d.loss, help="next-token NLL (paper) or KL to the dense model")
    p.add_argument("--tau-start", type=float, default=d.tau_start)
    p.add_argument("--tau-end", type=float, default=d.tau_end)
    p.add_argument("--noise-start", type=float, default=d.noise_start, help="Gumbel noise scale at the first step")
    p.add_argument("--noise-end", type=float, default=d.noise_end,
                   help="Gumbel noise scale at the last step (0: the last steps train the argmax decisions inference deploys)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=d.lr_schedule)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine: final lr as a share of --lr")
    p.add_argument("--hidden-distill", type=float, default=d.hidden_distill,
                   help="weight of the hidden-state distillation term (relative error of every layer's residual stream; --loss kl)")
    p.add_argument("--replacement", choices=["none", "bias", "lowrank"], default=RouterConfig.replacement,
                   help="what a skipped module leaves: nothing (paper), a learned vector, or a low-rank map of the hidden state")
    p.add_argument("--replacement-rank", type=int, default=RouterConfig.replacement_rank or 32,
                   help="rank of --replacement lowrank (default: %(default)s)")
    p.add_argument("--fit-sequences", type=int, default=d.fit_sequences,
                   help="training sequences the replacements are fitted on before tuning")
    p.add_argument("--router", choices=["linear", "mlp"], default=RouterConfig.router)
    p.add_argument("--init", choices=["execute", "importance"], default=RouterConfig.init,
                   help="start from the dense model, or from the static module cut by Block Influence")
    p.add_argument("--init-bias", type=float, default=RouterConfig.init_bias, help="execute-logit bias at init (0: random start)")
    p.add_argument("--kv-policy", choices=["keep", "drop"], default=RouterConfig.kv_policy,
                   help="keep: a token skipping attention still writes its keys/values (paper); drop: it writes none "
                        "at that layer (smaller KV cache at inference; trained with the same masking)")
    p.add_argument("--raw-input", action="store_true", help="feed routers the raw residual stream instead of its RMS-normalised form")
    p.add_argument("--no-calibrate", action="store_true", help="keep argmax threshold 0 instead of calibrating it to the target")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (measure first on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skipgpt", description="Per-token module skipping (SkipGPT) for HF decoder LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, layers, routable modules and their parameter counts")
    _model_args(p)

    p = sub.add_parser("tune", help="stage 1: train routers with the base model frozen")
    _model_args(p)
    _data_dir_arg(p)
    p.add_argument("--data", default=None, help="training text: c4, ptb, pydoc, a .txt/.jsonl file or hf:NAME (default: c4 if a data dir is set, else pydoc)")
    _tune_args(p, TuneConfig.steps)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")

    p = sub.add_parser("finetune", help="stage 2: LoRA with frozen routers (SkipGPT-RT-L), --joint or --dense")
    _model_args(p)
    _data_dir_arg(p)
    p.add_argument("--data", default=None, help="training text, as for tune")
    p.add_argument("--routers", help="router directory from 'skipgpt tune' (SkipGPT-RT-L)")
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
    p.add_argument("--target", type=float, default=f.joint.target, help="--joint: target sparsity")
    p.add_argument("--target-unit", choices=["params", "modules"], default=f.joint.target_unit, help="--joint")
    p.add_argument("--router-lr", type=float, default=f.joint.lr, help="--joint: router learning rate")
    p.add_argument("--seed", type=int, default=f.seed)
    p.add_argument("--save-every", type=int, default=f.save_every)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")

    p = sub.add_parser("export", help="one self-contained directory: weights (LoRA merged) + routers")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--routers", help="router directory")
    p.add_argument("--adapter", help="LoRA adapter directory from 'skipgpt finetune'")
    p.add_argument("--out", required=True)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy, dense or routed, with sparsity statistics")
    _model_args(p)
    _data_dir_arg(p)
    p.add_argument("--routers", help="router directory from 'skipgpt tune' (omit for the dense model)")
    p.add_argument("--adapter", help="LoRA adapter directory from 'skipgpt finetune'")
    p.add_argument("--pruned", help="pruned-model directory from 'skipgpt prune' or 'skipgpt compare'")
    p.add_argument("--data", default=None,
                   help="comma-separated: wikitext2, ptb, pydoc or file paths (default: wikitext2, or none when --tasks is given)")
    p.add_argument("--tasks", help="zero-shot tasks through lm-evaluation-harness, comma-separated or 'all': "
                                   "boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa (docs/zeroshot.md)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: the first N examples of each task")
    p.add_argument("--zeroshot-batch-size", type=int, default=8, help="zero-shot: requests per forward (default: %(default)s)")
    p.add_argument("--split", default="test")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--json", help="write results here")

    p = sub.add_parser("calibrate", help="re-target trained routers: set their threshold for another ratio, no training")
    _model_args(p)
    _data_dir_arg(p)
    p.add_argument("--routers", required=True, help="router directory from 'skipgpt tune'")
    p.add_argument("--target", type=float, required=True, help="ratio argmax routing should deliver, in [0, 1)")
    p.add_argument("--target-unit", choices=["params", "modules"], default=TuneConfig.target_unit)
    p.add_argument("--data", default=None, help="calibration text, as tune's --data (its held-out tail is used)")
    p.add_argument("--out", required=True, help="new router directory (the input one is left as it is)")

    p = sub.add_parser("prune", help="a static baseline: remove layers, modules or width on calibration text")
    _model_args(p)
    _data_dir_arg(p)
    p.add_argument("--method", required=True, help="shortgpt, joint-layer-drop, shortened-ppl, shortened-taylor, laco, slicegpt, llm-pruner")
    p.add_argument("--ratio", type=float, required=True, help="share of decoder-layer parameters to remove, in [0, 1)")
    p.add_argument("--data", default=None, help="calibration text, as tune's --data (its held-out tail is used)")
    p.add_argument("--calib-sequences", type=int, default=CompareConfig.calib_sequences)
    p.add_argument("--calib-seq-len", type=int, default=CompareConfig.calib_seq_len)
    p.add_argument("--out", required=True)

    p = sub.add_parser("compare", help="baselines and SkipGPT side by side at matched ratios, one protocol, one table")
    _model_args(p)
    _data_dir_arg(p)
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
    p.add_argument("--lora-steps", type=int, default=0, help="> 0: add a '+ LoRA' row after each static method")
    p.add_argument("--tasks", default="", help="zero-shot tasks for every row too (lm-eval; as eval's --tasks)")
    p.add_argument("--limit", type=int, default=None, help="--tasks: first N examples of each task")
    p.add_argument("--no-dense", action="store_true", help="leave out the dense reference row")
    p.add_argument("--report-only", action="store_true", help="write the table from finished rows; run nothing")
    p.add_argument("--out", required=True)

    p = sub.add_parser("generate", help="complete prompts with a routed model (skipped modules are not computed)")
    _model_args(p)
    p.add_argument("--routers", help="router directory (omit for the dense model)")
    p.add_argument("--adapter", help="LoRA adapter directory from 'skipgpt finetune'")
    p.add_argument("--pruned", help="pruned-model directory from 'skipgpt prune' or 'skipgpt compare'")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch (left-padded)")
    p.add_argument("--prompt-file", help="one prompt per line")
    g = GenerateConfig()
    p.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=g.temperature)
    p.add_argument("--top-p", type=float, default=g.top_p)
    p.add_argument("--top-k", type=int, default=g.top_k)
    p.add_argument("--seed", type=int, default=g.seed)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (instruct models)")
    p.add_argument("--speculative", action="store_true",
                   help="the routed model drafts, the same weights verify dense: the dense model's output (needs routers)")
    p.add_argument("--draft-tokens", help=f"tokens drafted per round with --speculative: K >= 1 or 'auto' (default {g.draft_tokens})")
    p.add_argument("--masked", action="store_true",
                   help="compute every module and multiply by the gate (the reference the skipping path must match)")
    p.add_argument("--json", help="write texts and sparsity here")

    p = sub.add_parser("demo", help="tune routers on the default model and compare with dense (what 'make demo' runs)")
    _model_args(p)
    _data_dir_arg(p)
    _tune_args(p, 70)
    p.add_argument("--eval-windows", type=int, default=40,
                   help="evaluate the first N windows of 1024 tokens (default %(default)s; 0 = the whole test set)")
    p.add_argument("--out", default="runs/demo")

    p = sub.add_parser("analyze", help="the paper's routing analyses as figures (PNG) with the JSON behind them")
    p.add_argument("kind", choices=ANALYSES, help="cosine (fig. 2), routing, sparsity-split (fig. 5), context-shift (fig. 6), ppl-curve (fig. 7)")
    _model_args(p)
    _data_dir_arg(p)
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
    p.add_argument("--results", help="ppl-curve: comma-separated result JSON files, each optionally LABEL=FILE")
    p.add_argument("--dataset", default="wikitext2", help="ppl-curve: which data set's perplexity (default: %(default)s)")
    p.add_argument("--methods", help="ppl-curve: draw only these methods, comma-separated (dense is always kept)")
    p.add_argument("--out", required=True, help="directory for the figure (and the JSON unless --json)")
    p.add_argument("--name", help="file name stem (default: analysis_KIND)")
    p.add_argument("--json", help="write the JSON here instead of OUT/NAME.json")
    return parser


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    model, _ = load_model(args.model, dtype=DTYPES[args.dtype], device="cpu")
    adapter = get_adapter(model)
    counts = branch_parameter_counts(model, adapter)
    text = model.config.get_text_config()
    info = {
        "model": args.model,
        "model_type": model.config.model_type,
        "layers": len(adapter.decoder_layers(model)),
        "routable_modules": len(counts),
        "hidden_size": text.hidden_size,
        "parameters_total": sum(p.numel() for p in model.parameters()),
        "parameters_per_attention": int(counts[0::2].mean()),
        "parameters_per_mlp": int(counts[1::2].mean()),
        "attention_share_of_routable": float(counts[0::2].sum() / counts.sum()),
    }
    print(table(["field", "value"], list(info.items())))
    return info


def _tune_config(args: argparse.Namespace) -> tuple[TuneConfig, RouterConfig]:
    tune_cfg = TuneConfig(
        target=args.target, target_unit=args.target_unit, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr, tau_start=args.tau_start, tau_end=args.tau_end,
        loss=args.loss, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        save_every=args.save_every, calibrate=not args.no_calibrate, budget_minutes=args.budget_minutes,
        noise_start=args.noise_start, noise_end=args.noise_end, lr_schedule=args.lr_schedule,
        min_lr_ratio=args.min_lr_ratio, hidden_distill=args.hidden_distill, fit_sequences=args.fit_sequences,
    )
    router_cfg = RouterConfig(router=args.router, init=args.init, init_bias=args.init_bias, input_norm=not args.raw_input,
                              kv_policy=args.kv_policy, replacement=args.replacement,
                              replacement_rank=args.replacement_rank if args.replacement == "lowrank" else 0)
    return tune_cfg, router_cfg


def _default_train_data(args: argparse.Namespace) -> str:
    return args.data or ("c4" if data_dir(args.data_dir) else "pydoc")


def _check_output(out: Path, resume: bool) -> None:
    if (out / RESULTS_NAME).exists():
        raise SkipGPTError(f"{out} already holds a finished run; pick another --out or delete it")
    if checkpoint.find(out) is not None and not resume:
        raise SkipGPTError(f"{out} holds an unfinished run; add --resume to continue it, or pick another --out")


@contextlib.contextmanager
def _no_partial_output(out: Path) -> Iterator[None]:
    """A run that fails before its first checkpoint leaves no directory it created behind."""
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and checkpoint.find(out) is None:
            shutil.rmtree(out, ignore_errors=True)
        raise


def run_tune(args: argparse.Namespace, data: str) -> dict[str, Any]:
    """Validate everything first, so bad input never leaves a half-made output directory."""
    tune_cfg, router_cfg = _tune_config(args)
    out = Path(args.out)
    _check_output(out, args.resume)
    source = load_source(data, "train", args.data_dir)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    get_adapter(model)
    train_ids, calib_ids = training_sequences(tokenizer, source.documents, tune_cfg.seq_len, tune_cfg.calib_sequences, tune_cfg.calib_seq_len)
    print(f"skipgpt: tuning routers on {source.description}: {train_ids.shape[0]} sequences of {tune_cfg.seq_len} tokens"
          f"{'' if calib_ids is None else f', {calib_ids.numel()} held-out tokens for calibration'}", file=sys.stderr)
    with _no_partial_output(out):
        return tune_routers(
            model, train_ids, tune_cfg, out, router_config=router_cfg, calib_ids=calib_ids, resume=args.resume,
            meta={"model": args.model, "data": source.description},
        )


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    results = run_tune(args, _default_train_data(args))
    cal = results["calibration"] or {}
    print(table(["field", "value"], [
        ("routers", args.out), ("tokens trained", results["tokens_trained"]), ("wall time", f"{results['wall_s']:.0f} s"),
        ("argmax ratio before calibration", pct(cal.get("ratio_before"))), ("after calibration", pct(cal.get("ratio_after"))),
    ]))
    return results


def _evaluate(model, tokenizer, specs: Sequence[str], *, split: str, data_dir_arg: str | None, seq_len: int,
              batch_size: int, max_windows: int | None, label: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for spec in specs:
        source = load_source(spec, split, data_dir_arg)
        r = perplexity(model, tokenizer, source.text(), seq_len=seq_len, batch_size=batch_size,
                       max_windows=max_windows, desc=f"{label} {spec}")
        rows.append((f"{label} / {spec}", {**r, "data": source.description}))
    return rows


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    data = args.data if args.data is not None else ("" if args.tasks else "wikitext2")
    specs = [s for s in data.split(",") if s]
    for spec in specs:  # fail on bad data before spending time on the model
        load_source(spec, args.split, args.data_dir)
    tasks = zeroshot.resolve_tasks(args.tasks) if args.tasks else []
    if tasks:
        zeroshot.find_task_files(tasks, args.data_dir)
    if not specs and not tasks:
        raise SkipGPTError("nothing to evaluate: give --data (perplexity) and/or --tasks (zero-shot accuracy)")
    model, tokenizer = _routed_model(args)
    label = ("routed" if has_routers(model) else "pruned" if args.pruned else "dense") + (" + LoRA" if args.adapter else "")
    rows = _evaluate(model, tokenizer, specs, split=args.split, data_dir_arg=args.data_dir, seq_len=args.seq_len,
                     batch_size=args.batch_size, max_windows=args.max_windows, label=label)
    if rows:
        print(ppl_rows(rows))
    results = {"model": args.model, "routers": args.routers, "adapter": args.adapter, "pruned": args.pruned, "results": {spec: r for spec, (_, r) in zip(specs, rows)}}
    if tasks:
        zs = zeroshot.evaluate_tasks(model, tokenizer, tasks, limit=args.limit, data_dir=args.data_dir,
                                     batch_size=args.zeroshot_batch_size)
        print(zeroshot.report(zs, label))
        results["results"]["zeroshot"] = zs
    if args.json:
        write_json(Path(args.json), results)
    return results


def _routed_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The base model with ``--routers`` and ``--adapter`` applied, as eval and generate take them."""
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if getattr(args, "pruned", None):  # analyze takes no --pruned
        if args.routers:
            raise SkipGPTError("--pruned and --routers are separate methods; give one of them")
        load_pruned(model, args.pruned)
    if args.routers:
        if has_routers(model):
            raise SkipGPTError(f"{args.model} carries its own routers (an exported model); omit --routers")
        load_routers(model, args.routers)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            prompts += [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        except OSError as err:
            raise SkipGPTError(f"cannot read --prompt-file: {err}") from None
    if not prompts:
        raise SkipGPTError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    if args.draft_tokens is not None and not args.speculative:
        raise SkipGPTError("--draft-tokens sets speculative decoding: add --speculative")
    draft = parse_draft_tokens(GenerateConfig.draft_tokens if args.draft_tokens is None else args.draft_tokens)
    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, seed=args.seed, chat=args.chat,
                         speculative=args.speculative, draft_tokens=draft)
    model, tokenizer = _routed_model(args)
    if has_routers(model):
        routing_state(model).skip_compute = not args.masked
    result = generate(model, tokenizer, prompts, cfg)
    for prompt, text in zip(prompts, result.texts):
        print(f"### {prompt}\n{text}\n")
    rows = [("new tokens", result.new_tokens), ("tokens/s", f"{result.new_tokens / result.seconds:.1f}")]
    if result.speculative:
        rows += [("acceptance rate", pct(result.speculative["acceptance_rate"])),
                 ("mean accepted length", f"{result.speculative['mean_accepted_length']:.2f}")]
    if result.sparsity:
        who = "draft: " if result.speculative else ""  # speculative output is the dense model's
        rows += [(f"{who}parameter ratio skipped", pct(result.sparsity["param_ratio"])), (f"{who}module sparsity", pct(result.sparsity["module_sparsity"])),
                 (f"{who}attention / MLP skipped", f"{pct(result.sparsity['attn_sparsity'])} / {pct(result.sparsity['mlp_sparsity'])}")]
    print(table(["field", "value"], rows))
    out = {"prompts": prompts, "texts": result.texts, "generate": cfg.to_dict(), "new_tokens": result.new_tokens,
           "seconds": round(result.seconds, 3), "sparsity": result.sparsity, "speculative": result.speculative,
           "model": args.model, "routers": args.routers}
    if args.json:
        write_json(Path(args.json), out)
    return out


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    mode = "joint" if args.joint else "dense" if args.dense else "routed"
    if (mode == "routed") != bool(args.routers):
        raise SkipGPTError("SkipGPT-RT-L needs --routers DIR; --joint trains fresh routers and --dense has none, so they take no --routers")
    base = TuneConfig()
    cfg = FinetuneConfig(
        mode=mode, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        lr=args.lr, warmup_ratio=args.warmup_ratio, loss=args.loss, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
        seed=args.seed, save_every=args.save_every,
        joint=TuneConfig.from_dict({**base.to_dict(), "target": args.target, "target_unit": args.target_unit,
                                    "lr": args.router_lr, "steps": args.steps, "seed": args.seed}),
    )
    out = Path(args.out)
    _check_output(out, args.resume)
    source = load_source(_default_train_data(args), "train", args.data_dir)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if args.routers:
        load_routers(model, args.routers)
    elif args.joint:
        attach_routers(model, RouterConfig())
    # The same split as 'tune': every mode trains on the same text, joint calibrates on the held-out tail.
    train_ids, calib_ids = training_sequences(tokenizer, source.documents, cfg.seq_len, base.calib_sequences, base.calib_seq_len)
    with _no_partial_output(out):
        _, results = finetune(model, train_ids, cfg, out, resume=args.resume, calib_ids=calib_ids,
                              meta={"model": args.model, "routers": args.routers, "data": source.description})
    print(table(["field", "value"], [("result", results["stage"]), ("adapter", args.out),
                                     ("tokens trained", results["tokens_trained"]), ("wall time", f"{results['wall_s']:.0f} s")]))
    return results


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    out = export_model(args.model, args.out, routers=args.routers, adapter=args.adapter)
    print(f"exported to {out}: load it with skipgpt.models.load_model({str(out)!r}) or 'skipgpt eval --model {out}'; "
          "plain transformers loads it as the dense model")
    return {"out": str(out)}


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
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    evaluate = lambda label: _evaluate(  # noqa: E731
        model, tokenizer, evals, split="test", data_dir_arg=args.data_dir, seq_len=1024, batch_size=1,
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


ANALYSES = ("cosine", "routing", "sparsity-split", "context-shift", "ppl-curve")


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


def _router_label(info: dict[str, Any]) -> str:
    target = "" if info["target"] is None else f", target {pct(info['target'])}"
    return f"routers {info['routers']} ({info['method']}{' + LoRA' if info['adapter'] else ''}{target})"


def cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from . import analysis, plots  # matplotlib only when analysing

    out_dir = Path(args.out)
    stem = args.name or f"analysis_{args.kind.replace('-', '_')}"
    png, json_path = out_dir / f"{stem}.png", Path(args.json) if args.json else out_dir / f"{stem}.json"
    if args.kind == "ppl-curve":
        if not args.results:
            raise SkipGPTError("ppl-curve needs --results FILE[,FILE...] (JSON from 'skipgpt eval --json' or rows)")
        result = analysis.ppl_points([s for s in args.results.split(",") if s], args.dataset,
                                     [m for m in (args.methods or "").split(",") if m] or None)
        context = f"{', '.join(result['models']) or 'model not recorded'}; {args.dataset}; from {len(result['points'])} result(s)"
        protocols = {(p.get("windows"), p.get("seq_len")) for p in result["points"]}
        if len(protocols) == 1 and None not in next(iter(protocols)):
            context += " (first {} windows of {} tokens)".format(*next(iter(protocols)))
    else:
        router_dirs = [d for d in (args.routers or "").split(",") if d]
        carries = (Path(args.model) / "router_config.json").is_file()
        if (args.kind == "sparsity-split" or (args.kind != "cosine" and not carries)) and not router_dirs:
            raise SkipGPTError(f"{args.kind} needs --routers DIR (a directory from 'skipgpt tune')")
        if args.kind in ("routing", "context-shift") and len(router_dirs) > 1:
            raise SkipGPTError(f"{args.kind} takes one router directory; sparsity-split compares several")
        infos = [analysis.router_set_info(d) for d in router_dirs]  # validates them before the model loads
        text, description = _analysis_text(args)
        seq_len = args.seq_len or (48 if args.kind in ("cosine", "routing") else 1024)
        num_seqs = 1 if args.kind in ("cosine", "routing") else args.num_seqs
        model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
        if router_dirs and has_routers(model):
            raise SkipGPTError(f"{args.model} carries its own routers (an exported model); omit --routers")
        ids = analysis.text_sequences(tokenizer, text, seq_len, num_seqs, args.offset)
        where = f"{ids.numel()} tokens of {description}" + (f" from token {args.offset}" if args.offset else "")
        context = f"model {args.model}"
        if args.kind == "cosine":
            result = analysis.cosine_analysis(model, ids[0], analysis.token_strings(tokenizer, ids[0].tolist()))
            context += f"; {where}" + ("; routers play no part (every module executes)" if router_dirs else "")
        elif args.kind == "sparsity-split":
            rows = []
            for info in infos:
                if has_routers(model):
                    detach_routers(model)
                load_routers(model, info["routers"])
                routed = load_adapter(model, info["adapter"]) if info["adapter"] else model
                print(f"skipgpt: {_router_label(info)}", file=sys.stderr)
                rows.append({**info, **analysis.sparsity_split(routed, ids)})
                if info["adapter"]:  # LoRA was injected into this model's layers: start from a clean one
                    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
            rows.sort(key=lambda r: (r["target"] is None, r["target"] or 0.0, r["name"]))
            result = {"kind": "sparsity-split", "router_sets": rows}
            context += f"; {where}"
            print(table(["router set", "method", "target", "attention skipped", "MLP skipped", "params skipped"], [
                (r["routers"], r["method"] + (" + LoRA" if r["adapter"] else ""), pct(r["target"]), pct(r["attn_sparsity"]),
                 pct(r["mlp_sparsity"]), pct(r["param_ratio"])) for r in rows]))
        else:
            info = infos[0] if infos else None
            if info:
                load_routers(model, info["routers"])
                model = load_adapter(model, info["adapter"]) if info["adapter"] else model
            context += f", {_router_label(info) if info else 'its own routers'}; {where}"
            if args.kind == "routing":
                result = analysis.routing_analysis(model, ids[0], analysis.token_strings(tokenizer, ids[0].tolist()))
            else:
                result = analysis.context_shift(model, ids, args.window)
            result["router_set"] = info
    result = {**result, "model": args.model, "context": context}
    plots.PLOTS[args.kind](result, png, context)
    write_json(json_path, result)
    print(f"skipgpt: figure {png}\nskipgpt: data   {json_path}")
    return result


def _calibration_and_training(args: argparse.Namespace, tokenizer: Any, seq_len: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    source = load_source(args.data or _default_train_data(args), "train", args.data_dir)
    cfg = CompareConfig(calib_sequences=args.calib_sequences, calib_seq_len=args.calib_seq_len,
                        tune=TuneConfig(seq_len=seq_len))
    train_ids, calib_ids = split_training_text(tokenizer, source.documents, cfg)
    return source, train_ids, calib_ids


def cmd_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    if not 0.0 <= args.target < 1.0:
        raise SkipGPTError(f"--target must be in [0, 1), got {args.target}")
    out = Path(args.out)
    if (out / CONFIG_NAME).exists():
        raise SkipGPTError(f"{out} already holds routers; pick another --out")
    source = load_source(args.data or _default_train_data(args), "train", args.data_dir)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    load_routers(model, args.routers)
    cfg = TuneConfig()
    _, calib_ids = training_sequences(tokenizer, source.documents, cfg.seq_len, cfg.calib_sequences, cfg.calib_seq_len)
    if calib_ids is None:
        raise SkipGPTError(f"{source.description} is too short to hold out {cfg.calib_sequences} x {cfg.calib_seq_len} calibration tokens")
    result = calibrate_threshold(model, calib_ids, args.target, args.target_unit)
    previous = read_router_config(args.routers)
    extra = {k: v for k, v in previous.items() if k not in ("format", "version", "router")}
    save_routers(model, out, extra={**extra, "recalibrated_from": str(args.routers), "recalibration": result})
    print(table(["field", "value"], [("routers", str(out)), ("ratio before", pct(result["ratio_before"])),
                                     ("ratio after", pct(result["ratio_after"])), ("threshold", f"{result['threshold']:.4g}")]))
    return result


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    method = get_method(args.method)
    if not 0.0 <= args.ratio < 1.0:
        raise SkipGPTError(f"--ratio must be in [0, 1), got {args.ratio}")
    out = Path(args.out)
    if (out / PLAN_NAME).exists():
        raise SkipGPTError(f"{out} already holds a pruned model; pick another --out or delete it")
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    source, _, calib_ids = _calibration_and_training(args, tokenizer, TuneConfig.seq_len)
    plan = method.prune(model, calib_ids, args.ratio)
    plan.extra["calibration"] = f"{calib_ids.shape[0]} x {calib_ids.shape[1]} held-out tokens of {source.description}"
    save_pruned(model, plan, out)
    print(table(["field", "value"], [("method", plan.method), ("target ratio", pct(plan.target_ratio)),
                                     ("achieved ratio", pct(plan.achieved_ratio)), ("modules removed", len(plan.removed)),
                                     ("saved", str(out))]))
    return plan.to_dict()


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    ratios = tuple(float(r) for r in args.ratio.split(",") if r)
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise SkipGPTError(f"--ratio takes ratios in (0, 1), comma-separated; got {args.ratio!r}")
    specs = [s for s in args.eval.split(",") if s]
    texts = {spec: load_source(spec, "test", args.data_dir).text() for spec in specs}
    cfg = CompareConfig(ratios=ratios, methods=tuple(m for m in args.methods.split(",") if m), eval_specs=tuple(specs),
                        seq_len=args.seq_len, max_windows=args.max_windows, calib_sequences=args.calib_sequences,
                        calib_seq_len=args.calib_seq_len, tune=TuneConfig(steps=args.steps, loss=args.loss),
                        lora_steps=args.lora_steps, include_dense=not args.no_dense,
                        tasks=tuple(t for t in args.tasks.split(",") if t), task_limit=args.limit,
                        report_only=args.report_only)
    cfg.resolved_methods()  # unknown names and missing task files fail before any model is loaded
    if cfg.tasks:
        zeroshot.find_task_files(list(cfg.tasks), args.data_dir)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    source, train_ids, calib_ids = _calibration_and_training(args, tokenizer, cfg.tune.seq_len)
    del model
    inputs = Inputs(
        fresh_model=lambda: load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)[0],
        tokenizer=tokenizer, train_ids=train_ids, calib_ids=calib_ids, eval_texts=texts,
        data_note=source.description, model_name=args.model, data_dir=args.data_dir,
    )
    rows = run_compare(inputs, cfg, Path(args.out))
    print((Path(args.out) / "comparison.md").read_text())
    return {"rows": rows}


COMMANDS = {"info": cmd_info, "tune": cmd_tune, "finetune": cmd_finetune, "export": cmd_export, "eval": cmd_eval, "generate": cmd_generate, "demo": cmd_demo, "calibrate": cmd_calibrate, "prune": cmd_prune, "compare": cmd_compare, "analyze": cmd_analyze}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except SkipGPTError as err:
        print(f"skipgpt: error: {err}", file=sys.stderr)
        return 2
    return 0
