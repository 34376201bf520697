"""What every command shares: model and data options, output-directory guards, loading a
routed (or pruned, or LoRA-recovered) model from the command line's options."""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator

from ..baselines import load_pruned, read_plan
from ..config import RouterConfig, TuneConfig
from ..data import CALIB_SAMPLES, DATA_DIR_ENV, data_dir
from ..devices import DTYPE_CHOICES, parse_max_memory
from ..errors import SkipGPTError
from ..lock import output_lock
from ..lora import load_adapter
from ..models import DEFAULT_MODEL, load_model
from ..routing.save_load import load_routers
from ..routing.surgery import has_routers
from ..training import checkpoint
from ..training.tune import RESULTS_NAME

def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"builtin name, local HF dir, .gguf file or hub id (default: {DEFAULT_MODEL}; with --pruned, the "
                        "model the plan was made from)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto (default): the checkpoint's own dtype (bf16 for most LLMs) on a GPU, float32 on a CPU, where "
                        "half-precision matmuls are fast only on processors with AVX-512 BF16 or AMX; routers, replacements "
                        "and LoRA keep float32 weights and routers decide in float32 whatever the model's dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (under accelerate launch: each process's own device)")
    p.add_argument("--device-map", default=None,
                   help="spread a model that does not fit one device over several (accelerate big-model loading): "
                        "auto, balanced, balanced_low_0 or sequential; overrides --device")
    p.add_argument("--max-memory", default=None, help="with --device-map: per-device limits, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    p.add_argument("--offload-folder", default=None, help="with --device-map: where weights that fit no device are offloaded")


def resolve_model(args: argparse.Namespace) -> None:
    """Fill in ``--model`` when it was not given: the base a ``--pruned`` plan records, else the
    builtin default. Runs before any handler, so every record names the model actually used."""
    if getattr(args, "model", "") is None:
        pruned = getattr(args, "pruned", None)
        args.model = (read_plan(pruned).base_model if pruned else "") or DEFAULT_MODEL


def load_from_args(args: argparse.Namespace, **overrides: Any) -> tuple[Any, Any]:
    """The model and tokenizer a command's model options name, placed as they say.

    Under ``accelerate launch`` each process loads onto its own device: the ``Accelerator`` is
    created here, before the model (with the launcher's settings, ``ACCELERATE_USE_CPU``
    included), never ``--device``'s ``cuda``, which is every process's cuda:0.
    """
    device_map = getattr(args, "device_map", None)
    if args.max_memory and device_map is None:
        raise SkipGPTError("--max-memory limits what --device-map puts on each device: add --device-map auto")
    device = args.device
    state = Accelerator()  # the training stages' own Accelerator() finds this state
    if state.num_processes > 1:
        if device_map is not None:
            raise SkipGPTError("--device-map spreads one model over the GPUs inside one process; under accelerate "
                               "launch each process holds a whole model. Use one or the other (docs/scale.md)")
        device = state.device
    options = {"dtype": args.dtype, "device": device, "device_map": device_map,
               "max_memory": parse_max_memory(args.max_memory), "offload_folder": args.offload_folder}
    return load_model(args.model, **{**options, **overrides})


def strict_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true",
                   help="refuse --routers tuned on other weights of the same shape (a fine-tune) instead of warning")


def data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help=f"directory holding the named data sets (default: ${DATA_DIR_ENV})")


def tune_args(p: argparse.ArgumentParser, steps: int) -> None:
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
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW decay of the routers' weight matrices (not their biases, not the replacements)")
    p.add_argument("--loss", choices=["nll", "kl"], default=d.loss, help="next-token NLL (paper) or KL to the dense model")
    p.add_argument("--tau-start", type=float, default=d.tau_start)
    p.add_argument("--tau-end", type=float, default=d.tau_end)
    p.add_argument("--noise-start", type=float, default=d.noise_start, help="Gumbel noise scale at the first step")
    p.add_argument("--noise-end", type=float, default=d.noise_end,
                   help="Gumbel noise scale at the last step (0: the last steps train the argmax decisions inference deploys)")
    p.add_argument("--sparsity-of", choices=["sampled", "argmax"], default=d.sparsity_of,
                   help="decisions the sparsity term counts: the sampled ones (paper) or those argmax inference takes")
    p.add_argument("--noise-from", type=float, default=d.noise_from,
                   help="fraction of the run kept at --noise-start before the noise anneals to --noise-end")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=d.lr_schedule)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine: final lr as a share of --lr")
    p.add_argument("--lr-decay-from", type=float, default=d.lr_decay_from,
                   help="cosine: fraction of the run kept at the full --lr before the decay starts")
    p.add_argument("--hidden-distill", type=float, default=d.hidden_distill,
                   help="weight of the hidden-state distillation term (relative error of every layer's residual stream; --loss kl)")
    p.add_argument("--replacement", choices=["none", "bias", "lowrank"], default=RouterConfig.replacement,
                   help="what a skipped module leaves: nothing (paper), a learned vector, or a low-rank map of the hidden state")
    p.add_argument("--replacement-rank", type=int, default=RouterConfig.replacement_rank,
                   help="rank of --replacement lowrank (default: %(default)s)")
    p.add_argument("--fit-sequences", type=int, default=d.fit_sequences,
                   help="training sequences the replacements are fitted on before tuning (default: enough of --seq-len "
                        "for max(8192, 4 x hidden size) tokens: 32 of 256 for a small model)")
    p.add_argument("--router", choices=["linear", "mlp"], default=RouterConfig.router)
    p.add_argument("--init", choices=["execute", "importance"], default=RouterConfig.init,
                   help="start from the dense model, or from the static module cut by Block Influence")
    p.add_argument("--init-bias", type=float, default=RouterConfig.init_bias, help="execute-logit bias at init (0: random start)")
    p.add_argument("--kv-policy", choices=["keep", "drop"], default=RouterConfig.kv_policy,
                   help="keep: a token skipping attention still writes its keys/values (paper); drop: it writes none "
                        "at that layer (smaller KV cache at inference; trained with the same masking)")
    p.add_argument("--raw-input", action="store_true", help="feed routers the raw residual stream instead of its RMS-normalised form")
    p.add_argument("--no-calibrate", action="store_true", help="keep argmax threshold 0 instead of calibrating it to the target")
    p.add_argument("--calib-sample", choices=CALIB_SAMPLES, default=d.calib_sample,
                   help="the held-out calibration text: the tail of the training text, or whole documents drawn "
                        "evenly from across it (spread)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (measure first on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every)


def tune_config(args: argparse.Namespace) -> tuple[TuneConfig, RouterConfig]:
    tune_cfg = TuneConfig(
        target=args.target, target_unit=args.target_unit, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr, weight_decay=args.weight_decay,
        tau_start=args.tau_start, tau_end=args.tau_end,
        loss=args.loss, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        save_every=args.save_every, calibrate=not args.no_calibrate, calib_sample=args.calib_sample, budget_minutes=args.budget_minutes,
        noise_start=args.noise_start, noise_end=args.noise_end, noise_from=args.noise_from, sparsity_of=args.sparsity_of,
        lr_schedule=args.lr_schedule, min_lr_ratio=args.min_lr_ratio, lr_decay_from=args.lr_decay_from,
        hidden_distill=args.hidden_distill, fit_sequences=args.fit_sequences,
    )
    router_cfg = RouterConfig(router=args.router, init=args.init, init_bias=args.init_bias, input_norm=not args.raw_input,
                              kv_policy=args.kv_policy, replacement=args.replacement,
                              replacement_rank=args.replacement_rank if args.replacement == "lowrank" else 0)
    return tune_cfg, router_cfg


def default_train_data(args: argparse.Namespace) -> str:
    return args.data or ("c4" if data_dir(args.data_dir) else "pydoc")


def check_output(out: Path, resume: bool) -> None:
    if (out / RESULTS_NAME).exists():
        raise SkipGPTError(f"{out} already holds a finished run; pick another --out or delete it")
    if checkpoint.find(out) is not None and not resume:
        raise SkipGPTError(f"{out} holds an unfinished run; add --resume to continue it, or pick another --out")


@contextlib.contextmanager
def no_partial_output(out: Path) -> Iterator[None]:
    """A run that fails before its first checkpoint leaves no directory it created behind."""
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and checkpoint.find(out) is None:
            shutil.rmtree(out, ignore_errors=True)
        raise


@contextlib.contextmanager
def writing(out: Path, args: argparse.Namespace) -> Iterator[None]:
    """A training run's hold on its --out: locked (and proven writable) before any work starts,
    and gone again if the run fails before its first checkpoint."""
    with no_partial_output(out), output_lock(out, f"skipgpt {args.command}"):
        yield


def routed_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The base model with ``--routers`` and ``--adapter`` applied, as eval and generate take them."""
    model, tokenizer = load_from_args(args)
    if getattr(args, "pruned", None):  # analyze takes no --pruned
        if args.routers:
            raise SkipGPTError("--pruned and --routers are separate methods; give one of them")
        load_pruned(model, args.pruned)
    if args.routers:
        if has_routers(model):
            raise SkipGPTError(f"{args.model} carries its own routers (an exported model); omit --routers")
        load_routers(model, args.routers, strict=getattr(args, "strict", False))
    if args.adapter:
        model = load_adapter(model, args.adapter)
    return model, tokenizer
