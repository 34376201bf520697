"""skipgpt on models of real LLM shapes (random weights, nothing downloaded): memory plans,
an end-to-end run with its peak memory, and the skipping engine's speed on a GPU.

    python benchmarks/scale.py                                         # memory plans of 8B and 70B (meta device, seconds)
    python benchmarks/scale.py --plan --shape llama-3.1-8b --batch 8   # one shape, another tuning batch
    python benchmarks/scale.py --shape llama-3.2-1b                    # fit + tune + eval + generate on this CPU, in bf16
    python benchmarks/scale.py --shape tiny                            # the same in seconds (smoke test)
    python benchmarks/scale.py --speed --shape llama-3.1-8b --device cuda   # prefill / decode against dense and ideal

Three modes (``--plan`` is the default for the 8B and 70B shapes, ``--run`` for 1B and tiny):

* ``--plan``: the memory of tuning, evaluating and generating per GPU, for 1, 2, 4 and 8 GPUs of
  ``--gpu-memory``, computed on the meta device. Weights are split over the GPUs as transformers'
  ``device_map="auto"`` splits them (accelerate's ``get_balanced_memory`` then
  ``infer_auto_device_map``); activations, optimizer state, the replacement fit and the KV cache
  are formulas below, one per quantity, each saying where its numbers come from. The activation
  formula is checked against the bytes autograd really keeps in a tuning step of small shapes.
* ``--run``: builds the shape on ``--device`` in ``--dtype``, attaches routers (the default
  recipe, low-rank replacements), fits the replacements and trains ``--steps`` tuning steps
  (``tune_routers``), evaluates ``--eval-tokens`` tokens, and times ``--new-tokens`` greedy tokens
  with synthetic routers against dense. Reports per-phase wall time and memory (peak RSS; on
  CUDA also the allocator's peak) and checks the peak against the issue's target.
* ``--speed``: prefill and decode of the shape against HF dense at synthetic skip ratios, with
  the ideal speedup of the same routing decisions (skipgpt.inference.cost).

``--run`` and ``--speed`` share every function between devices: ``--device cpu --shape tiny``
runs the path a GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import transformers
from accelerate.utils import convert_file_size_to_int, get_balanced_memory, infer_auto_device_map
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the sibling benchmark: synthetic routers, interleaved timing)

from skipgpt import (RouterConfig, TuneConfig, attach_routers, detach_routers, get_adapter,  # noqa: E402
                     router_parameters, routing_state)
from skipgpt.evaluation.perplexity import perplexity  # noqa: E402
from skipgpt.evaluation.report import table  # noqa: E402
from skipgpt.files import write_json  # noqa: E402
from skipgpt.routing.surgery import gate_mode  # noqa: E402
from skipgpt.training import tune as tune_module  # noqa: E402
from skipgpt.training.loop import LOG_NAME  # noqa: E402
from skipgpt.next_token import logit_chunk_tokens  # noqa: E402
from skipgpt.training.losses import routed_loss  # noqa: E402
from skipgpt.training.replacements import fit_batch_size, fit_sequence_count  # noqa: E402

GiB = 2**30
F32 = 4  # bytes of a float32: routers, their statistics, logits and optimizer state are float32
ROOT = Path(__file__).resolve().parents[1]

# The shapes of the real models' config.json (meta-llama on the Hugging Face Hub); weights random.
LLAMA3_ROPE = dict(rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, vocab_size=512, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=4096),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, **LLAMA3_ROPE,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False, **LLAMA3_ROPE,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=128, vocab_size=32000, tie_word_embeddings=False,
                        rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5),
}
PLAN_SHAPES = ("llama-3.1-8b", "llama-2-70b")  # --plan is their default mode; --run is the others'
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_COUNTS = (1, 2, 4, 8)
# The targets.
RSS_TARGET = "peak RSS <= 2 x bf16 weight bytes + 1 GiB"


def rss_target(bf16_weight_bytes: int) -> int:
    return 2 * bf16_weight_bytes + GiB
SPEED_TARGETS = {"prefill_efficiency": 0.85, "decode_efficiency": 0.75}  # batch 1, at these skip ratios:
SPEED_TARGET_RATIOS = (0.25, 0.40)


def model_config(shape: str, layers: int | None = None) -> LlamaConfig:
    """The shape's config; ``layers`` overrides the depth (a quick look at a wide shape)."""
    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})})
    config._name_or_path = f"random-{shape}"
    return config


def build_model(config: LlamaConfig, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights created where they will run (``meta`` for plans: no memory at all)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# Memory formulas: bytes as functions of the shape, one quantity each.


@dataclass(frozen=True)
class Dims:
    """What the formulas need of a model and its router set."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    replacement: str  # RouterConfig.replacement
    rank: int  # its rank (low rank only)

    @classmethod
    def of(cls, config: Any, router: RouterConfig) -> "Dims":
        c = config.get_text_config()
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, head_dim,
                   c.vocab_size, c.num_hidden_layers, router.replacement, router.replacement_rank)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def module_saved_bytes(d: Dims, kind: str, elem: int, input_grad: bool = True) -> int:
    """Bytes per token that autograd keeps for the backward of one routed module (attention or
    MLP) in a router-tuning step: base frozen, routers and replacements trained, Gumbel gates,
    the base model in a dtype of ``elem`` bytes without autocast. Op by op through
    skipgpt/routing/forward.py and routers.py and transformers' Llama layer under SDPA:

    * the router's linear keeps its input, the RMS-normalised state in float32 (for its weight
      gradient); a low-rank replacement reads the same tensor (forward.py's
      ``_shared_normalised``) and keeps its float32 rank-r middle;
    * the gate mixing g·f(x) + (1 − g)·h(x) keeps f(x) and h(x) in the model dtype (the gates'
      gradient); gate bookkeeping (soft sample, argmax index, g, 1 − g) about 30 bytes;
    * the rest is kept only where a gradient flows through the module's input, which the
      first module of the model lacks (the embeddings are frozen; gradients start at its gate):
      the branch's pre-norm keeps its float32 upcast and rsqrt (in a float32 model the upcast is
      the state itself); the routing normalisation (routers.py's ``_RMSNormalised``) keeps the state
      itself, in its own dtype, and a float32 scale per token;
      attention keeps q, k, v (at the KV heads: SDPA's GQA) and its
      output in the model dtype and a float32 log-sum-exp per head; the MLP keeps the gate and
      up projections and the activation. A frozen projection keeps no input (no weight gradient).

    tests/test_scale_plan.py and ``--plan`` check the sum against saved-tensor hooks.
    """
    h, lowrank = d.hidden, d.replacement == "lowrank"
    normalised = F32 * h + (F32 * d.rank if lowrank else 0)  # shared by the router and the replacement
    mixed = elem * h * (2 if d.replacement != "none" else 1)
    gates = 2 * F32 + 8 + 2 * elem
    kept = normalised + mixed + gates
    if not input_grad:
        return kept
    state = F32 * h + (elem * h if elem < F32 else 0)  # the pre-norm's upcast; the state itself (one storage)
    upcasts = state + F32 * 2  # rsqrt of the pre-norm, the scale of the (shared) routing normalisation
    if kind == "attn":
        body = elem * (2 * d.q_dim + 2 * d.kv_dim) + F32 * d.heads
    else:
        body = 3 * elem * d.intermediate
    return kept + upcasts + body


def layer_saved_bytes(d: Dims, elem: int, first: bool = False) -> int:
    """Bytes per token kept for backward by one decoder layer (:func:`module_saved_bytes` of its
    two modules); the model's first layer has no gradient into its attention."""
    return module_saved_bytes(d, "attn", elem, input_grad=not first) + module_saved_bytes(d, "mlp", elem)


def head_saved_bytes(d: Dims, elem: int, batch: int, seq: int) -> int:
    """Bytes kept for backward outside the layers: the final RMS norm's float32 upcast and rsqrt
    per token, and the rotary cos/sin tables once per position (shared by the batch and layers)."""
    upcast = F32 * d.hidden + F32
    return batch * seq * upcast + seq * 2 * elem * d.head_dim


def loss_saved_bytes(d: Dims, elem: int, tokens: int) -> int:
    """What the KL loss (skipgpt/training/losses.py, skipgpt/next_token.py) keeps for backward. Over more tokens than one
    chunk of logits, chunks run under activation checkpointing and keep only their inputs, the
    teacher's and the student's final hidden states ([tokens, d] each, model dtype); within one
    chunk nothing is recomputed, and it keeps the teacher's and the student's float32
    log-probabilities ([tokens, V] each, for the KL's and the log-softmax's backward)."""
    if tokens > logit_chunk_tokens(d.vocab):
        return 2 * elem * d.hidden * tokens
    return 2 * F32 * d.vocab * tokens


def loss_working_bytes(d: Dims, tokens: int) -> int:
    """One chunk of the KL's float32 logits at a time (at most ``LOGIT_CHUNK_BYTES`` of them), with
    about five chunk-sized tensors alive at once (two logits, two log-softmaxes, the pointwise KL or
    the gradient: losses.py's own count), never the whole [B·T, V]."""
    return 5 * min(tokens, logit_chunk_tokens(d.vocab)) * d.vocab * F32


def checkpointed_layer_bytes(d: Dims, elem: int) -> int:
    """Bytes per token a layer under activation checkpointing keeps between forward and backward:
    its input, in the model dtype (everything else is recomputed)."""
    return elem * d.hidden


def backward_working_bytes(d: Dims, elem: int, tokens: int, checkpointing: bool) -> int:
    """Transient memory of the backward pass (an estimate, not measured on CPU): the gradients of
    one layer's tensors are about as large as what that layer keeps, and under checkpointing the
    layer being recomputed holds its saved tensors again, so one (two) layers' worth."""
    return (2 if checkpointing else 1) * layer_saved_bytes(d, elem) * tokens


def optimizer_bytes(router_params: int) -> int:
    """AdamW on the routers: gradient, first and second moment in float32 (the routers are float32
    already, so their weights are the fp32 master copy and are counted with the weights)."""
    return 3 * F32 * router_params


def kv_cache_bytes(d: Dims, batch: int, seq: int, elem: int, layers: int | None = None) -> int:
    """The KV cache of ``batch`` sequences of ``seq`` tokens: keys and values of every layer at the
    KV heads, in the model dtype (policy ``keep``: every token's, as the dense model)."""
    return batch * seq * (d.layers if layers is None else layers) * 2 * d.kv_heads * d.head_dim * elem


def layer_forward_bytes(d: Dims, elem: int, tokens: int) -> int:
    """Transient memory of one layer's no-grad forward over ``tokens``: the largest set alive at
    once is the MLP's, its input and output with the gate, up and activation tensors
    ([tokens, 2·d + 3·i] in the model dtype)."""
    return tokens * elem * (3 * d.intermediate + 2 * d.hidden)


def fit_bytes(d: Dims, elem: int, tokens: int, seq: int) -> int:
    """Extra memory of the replacement fit, which streams the model one layer at a time
    (skipgpt/training/replacements.py): the fit tokens' hidden states entering the layer, [N, d]
    in the model dtype; x̂ᵀx̂ and x̂ᵀy summed in float32 for the layer's two modules (four d × d);
    the solve of one module in float64 (covariance, cross-covariance and the regression, three
    d × d); and the layer's forward over one batch of the fit."""
    batch_tokens = fit_batch_size(seq) * seq
    return tokens * d.hidden * elem + 4 * F32 * d.hidden**2 + 3 * 8 * d.hidden**2 + layer_forward_bytes(d, elem, batch_tokens)


def eval_working_bytes(d: Dims, elem: int, tokens: int) -> int:
    """Transient memory of a no-grad forward over ``tokens`` (evaluation, prefill): one layer's
    (:func:`layer_forward_bytes`) and the chunked NLL's float32 logits and log-softmax (two chunks)."""
    chunk = min(tokens, logit_chunk_tokens(d.vocab))
    return layer_forward_bytes(d, elem, tokens) + 2 * chunk * d.vocab * F32


@dataclass(frozen=True)
class Workload:
    """What one plan row asks of the GPUs."""

    batch: int = 4  # tuning micro-batch
    seq: int = 2048
    kv_batch: int = 8  # sequences generating at once
    new_tokens: int = 64
    eval_batch: int = 1
    elem: int = 2  # bf16
    fit_tokens: int = 0  # tokens of the replacement fit (the package's count: fit_sequence_count)


def tune_activation_bytes(d: Dims, w: Workload, batch: int, layers: Sequence[int], head: bool, checkpointing: bool) -> int:
    """Activations of one tuning step of ``batch`` × ``w.seq`` tokens on the GPU holding ``layers``
    (and the LM head if ``head``): what backward needs, its working set, and the loss's."""
    tokens = batch * w.seq
    if not layers and not head:
        return 0
    if checkpointing:
        kept = len(layers) * checkpointed_layer_bytes(d, w.elem) * tokens
    else:
        kept = sum(layer_saved_bytes(d, w.elem, first=i == 0) for i in layers) * tokens
    total = kept + (backward_working_bytes(d, w.elem, tokens, checkpointing) if layers else 0)
    if head:
        total += head_saved_bytes(d, w.elem, batch, w.seq) + loss_saved_bytes(d, w.elem, tokens) + loss_working_bytes(d, tokens)
    return total


# ---------------------------------------------------------------------------------------------
# Placement: which GPU holds what, as device_map="auto" would.


@dataclass
class GpuShare:
    gpu: int
    layers: list[int]
    weight_bytes: int  # base weights and routers, each in its own dtype
    router_params: int
    embeddings: bool
    head: bool


@dataclass
class Placement:
    gpus: int
    shares: list[GpuShare]
    offloaded: list[str]  # modules the map put off the GPUs (the weights do not fit)
    embeddings: int | str  # the device of the input embeddings: a GPU index, or "disk"
    head: int | str  # that of the LM head


def _device_of(name: str, device_map: dict[str, Any]) -> Any:
    """The device ``device_map`` gives the module or tensor ``name`` (its longest listed prefix)."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return device_map[key]
    raise KeyError(name)


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate warns for every GPU index that this machine lacks; a plan is made without them."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def place(model: torch.nn.Module, gpus: int, gpu_bytes: int) -> Placement:
    """Split ``model`` (on meta, routers attached) over ``gpus`` GPUs of ``gpu_bytes`` as
    transformers' ``device_map="auto"`` does: accelerate's balanced budgets, then
    ``infer_auto_device_map`` keeping each decoder layer whole; what fits nowhere goes to "disk"."""
    no_split = list(model._no_split_modules)
    with _quiet_accelerate():
        budget = get_balanced_memory(model, {i: gpu_bytes for i in range(gpus)}, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    layers_prefix = "model.layers."
    shares = {g: GpuShare(g, [], 0, 0, False, False) for g in range(gpus)}
    offloaded: set[str] = set()
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named:
        device = _device_of(name, device_map)
        if not isinstance(device, int):
            offloaded.add(name.rsplit(".", 1)[0])
            continue
        shares[device].weight_bytes += tensor.numel() * tensor.element_size()
        if ".skip_routers." in name:
            shares[device].router_params += tensor.numel()
    for i in range(len(model.model.layers)):
        device = _device_of(f"{layers_prefix}{i}", device_map)
        if isinstance(device, int):
            shares[device].layers.append(i)
    for attr, module in (("embeddings", "model.embed_tokens"), ("head", "lm_head")):
        device = _device_of(module, device_map)
        if isinstance(device, int):
            setattr(shares[device], attr, True)
    return Placement(gpus, list(shares.values()), sorted(offloaded), _device_of("model.embed_tokens", device_map),
                     _device_of("lm_head", device_map))


@dataclass
class GpuMemory:
    """One GPU's bytes in each phase: tuning (after the fit), the fit, evaluation and generation."""

    gpu: int
    layers: int
    weights: int
    activations: int
    optimizer: int
    fit: int
    kv: int
    eval_working: int

    @property
    def tune_peak(self) -> int:
        """The fit's statistics are freed before training starts: the two never add."""
        return self.weights + max(self.fit, self.activations + self.optimizer)

    @property
    def eval_peak(self) -> int:
        return self.weights + self.kv + self.eval_working


def gpu_memory(d: Dims, share: GpuShare, w: Workload, batch: int, checkpointing: bool) -> GpuMemory:
    has_layers = bool(share.layers)
    eval_tokens = w.eval_batch * w.seq
    return GpuMemory(
        gpu=share.gpu,
        layers=len(share.layers),
        weights=share.weight_bytes,
        activations=tune_activation_bytes(d, w, batch, share.layers, share.head, checkpointing),
        optimizer=optimizer_bytes(share.router_params),
        fit=fit_bytes(d, w.elem, w.fit_tokens, w.seq) if has_layers else 0,
        kv=kv_cache_bytes(d, w.kv_batch, w.seq + w.new_tokens, w.elem, layers=len(share.layers)),
        eval_working=eval_working_bytes(d, w.elem, eval_tokens) if has_layers else 0,
    )


def largest_batch(d: Dims, placement: Placement, w: Workload, limit: int, checkpointing: bool, cap: int = 1024) -> int:
    """The largest tuning micro-batch whose peak fits every GPU (0: not even one sequence)."""
    def fits(batch: int) -> bool:
        return all(gpu_memory(d, s, w, batch, checkpointing).tune_peak <= limit for s in placement.shares)
    best = 0
    while best < cap and fits(best + 1):
        best += 1
    return best


def plan_rows(shape: str, w: Workload, gpu_bytes: int, reserve: int, layers: int | None = None) -> list[dict[str, Any]]:
    """One row per GPU count: the largest per-GPU value of each quantity and of each phase's peak,
    whether both phases fit (peak + ``reserve`` within ``gpu_bytes``), and the largest batch."""
    config = model_config(shape, layers)
    model = build_model(config, "meta", torch.bfloat16)
    attach_routers(model, RouterConfig())
    d = Dims.of(config, routing_state(model).config)
    w = dataclasses.replace(w, fit_tokens=fit_sequence_count(model, None, w.seq) * w.seq)
    limit = gpu_bytes - reserve
    rows = []
    for gpus in GPU_COUNTS:
        placement = place(model, gpus, limit)
        per_gpu = {ckpt: [gpu_memory(d, s, w, w.batch, ckpt) for s in placement.shares] for ckpt in (False, True)}
        plain = per_gpu[False]
        placed = not placement.offloaded
        tune_peak = {ckpt: max(m.tune_peak for m in per_gpu[ckpt]) for ckpt in per_gpu}
        eval_peak = max(m.eval_peak for m in plain)
        rows.append({
            "shape": shape, "gpus": gpus,
            "embeddings_on": placement.embeddings, "head_on": placement.head,
            "layers_per_gpu": [len(s.layers) for s in placement.shares],
            "offloaded": placement.offloaded,
            "weights": max(m.weights for m in plain),
            "activations": max(m.activations for m in plain),
            "activations_checkpointing": max(m.activations for m in per_gpu[True]),
            "optimizer": max(m.optimizer for m in plain),
            "fit": max(m.fit for m in plain),
            "kv": max(m.kv for m in plain),
            "eval_working": max(m.eval_working for m in plain),
            "tune_peak": tune_peak[False], "tune_peak_checkpointing": tune_peak[True], "eval_peak": eval_peak,
            "fits_tune": placed and tune_peak[False] <= limit,
            "fits_tune_checkpointing": placed and tune_peak[True] <= limit,
            "fits_eval": placed and eval_peak <= limit,
            "max_batch": largest_batch(d, placement, w, limit, False) if placed else 0,
            "max_batch_checkpointing": largest_batch(d, placement, w, limit, True) if placed else 0,
            "per_gpu": [asdict(m) | {"tune_peak": m.tune_peak, "eval_peak": m.eval_peak} for m in plain],
        })
    return rows


def plan_targets(rows: list[dict[str, Any]], batch_target: int = 4) -> list[dict[str, Any]]:
    """The issue's targets, where the rows have their shapes."""
    find = {(r["shape"], r["gpus"]): r for r in rows}
    targets = []
    if r := find.get(("llama-3.1-8b", 1)):
        targets.append({"target": f"8B tunes on one GPU, seq 2048, batch >= {batch_target} (activation checkpointing)",
                        "value": f"largest batch {r['max_batch_checkpointing']}", "holds": r["max_batch_checkpointing"] >= batch_target})
        targets.append({"target": f"8B tunes on one GPU, seq 2048, batch >= {batch_target} (no checkpointing)",
                        "value": f"largest batch {r['max_batch']}", "holds": r["max_batch"] >= batch_target})
    if r := find.get(("llama-2-70b", 4)):
        targets.append({"target": "70B evaluates and generates on 4 GPUs (device_map)",
                        "value": f"peak {r['eval_peak'] / GiB:.1f} GiB per GPU", "holds": r["fits_eval"]})
    if r := find.get(("llama-2-70b", 8)):
        targets.append({"target": "70B tunes on 8 GPUs (device_map), batch 1 or more",
                        "value": f"largest batch {r['max_batch']} ({r['max_batch_checkpointing']} checkpointed)",
                        "holds": r["max_batch"] >= 1 or r["max_batch_checkpointing"] >= 1})
    return targets


# ---------------------------------------------------------------------------------------------
# Measured activations: what autograd keeps in one tuning step.


def prepare_for_tuning(model: torch.nn.Module) -> None:
    """The state tune_routers trains in: base frozen, routers trainable, training mode."""
    model.requires_grad_(False)
    for p in router_parameters(model):
        p.requires_grad_(True)
    model.train()


def measured_saved_bytes(model: torch.nn.Module, batch: torch.Tensor, cfg: TuneConfig) -> int:
    """Bytes autograd keeps for backward in the forward of one tuning step (``routed_loss`` under
    Gumbel gates, no backward run): every tensor a saved-tensor hook sees, counted once per
    storage, the model's own parameters and buffers left out (they are the weights)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with gate_mode(model, "gumbel", tau=cfg.tau_start, noise=cfg.noise_start), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = routed_loss(model, batch, cfg)
    del loss
    return sum(storages.values())


def estimated_saved_bytes(d: Dims, elem: int, batch: int, seq: int) -> int:
    """What :func:`measured_saved_bytes` should see, by the formulas: every layer's saved bytes
    (the first without gradient into its attention), the head's and the loss's inputs."""
    per_token = sum(layer_saved_bytes(d, elem, first=i == 0) for i in range(d.layers))
    tokens = batch * seq
    return per_token * tokens + head_saved_bytes(d, elem, batch, seq) + loss_saved_bytes(d, elem, tokens)


def activation_check(shape: str, dtype: torch.dtype, batch: int, seq: int, layers: int | None = None,
                     device: str = "cpu", router: RouterConfig | None = None) -> dict[str, Any]:
    """Estimate and measurement of one tuning step's saved activations on a real (small) model."""
    config = model_config(shape, layers)
    model = build_model(config, device, dtype)
    attach_routers(model, router or RouterConfig())
    prepare_for_tuning(model)
    ids = random_ids(config.vocab_size, batch, seq, device)
    measured = measured_saved_bytes(model, ids, TuneConfig(seq_len=seq, batch_size=batch))
    estimated = estimated_saved_bytes(Dims.of(config, routing_state(model).config), model.dtype.itemsize, batch, seq)
    return {"shape": shape, "layers": config.num_hidden_layers, "dtype": str(dtype).removeprefix("torch."),
            "batch": batch, "seq": seq, "estimated": estimated, "measured": measured, "ratio": estimated / measured}


def random_ids(vocab: int, batch: int, seq: int, device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


# ---------------------------------------------------------------------------------------------
# Measuring a run: wall time and memory per phase.


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Phase:
    """One phase of a run: its wall time and memory."""

    name: str
    seconds: float = 0.0
    rss_peak: int = 0  # sampled every ``Monitor.interval`` seconds
    rss_end: int = 0
    device_peak: int | None = None  # CUDA allocator's peak in the phase


class Monitor:
    """Wall time and memory per phase, phases nested or not: RSS sampled by a thread (a phase's
    own peak, which ``ru_maxrss`` cannot give), and on CUDA the allocator's peak. The counters
    restart at every phase boundary, after being folded into every phase still open."""

    def __init__(self, device: str, interval: float = 0.05):
        self.cuda = torch.device(device).type == "cuda"
        self.interval = interval
        self.phases: list[Phase] = []
        self._open: list[Phase] = []
        self._peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _fold(self) -> None:
        """Give the open phases the peaks since the last boundary, and restart the counters."""
        rss = max(self._peak, rss_bytes())
        device = None
        if self.cuda:
            torch.cuda.synchronize()
            device = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        for record in self._open:
            record.rss_peak = max(record.rss_peak, rss)
            if device is not None:
                record.device_peak = max(record.device_peak or 0, device)
        self._peak = rss_bytes()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        record = Phase(name)
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        self._fold()
        self._open.append(record)
        start = time.perf_counter()
        try:
            yield record
        finally:
            self._fold()
            self._open.remove(record)
            record.seconds = time.perf_counter() - start
            record.rss_end = rss_bytes()
            self.phases.append(record)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {record.seconds:.1f} s, RSS peak {size(record.rss_peak)}"
                  + (f", GPU peak {size(record.device_peak)}" if record.device_peak is not None else ""),
                  file=sys.stderr, flush=True)


@contextlib.contextmanager
def around(module: Any, name: str, context: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Run every call of ``module.name`` (a function that another function calls through its
    module) inside a fresh ``context()``: how the fit and calibration inside ``tune_routers`` get
    their own phases, and speed.py's timed runs a progress bar."""
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with context():
            return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def layer_progress(model: torch.nn.Module, tokens: int, desc: str, observed: bool = False) -> Iterator[None]:
    """A progress bar with ETA over tokens × decoder layers computed, for phases whose loops are
    inside the package. ``observed``: counted where the routed layers report to observers (the
    replacement fit, whose recording forwards pass layers through uncomputed); else by forward
    hooks on the layers."""
    layers = get_adapter(model).decoder_layers(model)
    bar = tqdm(total=tokens * len(layers), desc=desc, unit="tok·layer", unit_scale=True, file=sys.stderr)
    state = routing_state(model) if observed else None
    observing = state is not None

    def observe(index: int, x: torch.Tensor, _update: torch.Tensor) -> None:
        if index % 2:  # a layer's MLP: once per layer
            bar.update(x.shape[:-1].numel())

    def hook(_module: torch.nn.Module, args: tuple, _out: Any) -> None:  # returns None: the output stays
        bar.update(args[0].shape[:-1].numel())

    handles = [] if observing else [layer.register_forward_hook(hook) for layer in layers]
    if observing:
        state.observers.append(observe)
    try:
        yield
    finally:
        if observing:
            state.observers.remove(observe)
        for handle in handles:
            handle.remove()
        bar.close()


class IdTokenizer:
    """Text of space-separated token ids back to those ids: random ids through the real
    perplexity protocol without a vocabulary."""

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(w) for w in text.split()]}


# ---------------------------------------------------------------------------------------------
# Speed: dense against synthetic routing, interleaved (benchmarks/speed.py's machinery).


def speed_rows(model: torch.nn.Module, device: str, batches: Sequence[int], prompt: int, new_tokens: int,
               ratios: Sequence[float], reps: int) -> list[dict[str, Any]]:
    """speed.py's cells: HF dense, routers deciding but nothing skipped, and synthetic routers
    skipping each ratio (KV policy keep), timed round-robin; a progress bar over the runs."""
    vocab = model.config.get_text_config().vocab_size
    options = argparse.Namespace(routers=None, ratios=list(ratios), kv_policies=["keep"], reps=reps,
                                 new_tokens=new_tokens, device=device)
    configs = speed.make_configs(model, options, random_ids(vocab, 1, min(256, prompt), device, seed=1))
    rows = []
    bar = tqdm(total=len(batches) * (reps + 1) * len(configs), desc="speed", unit="run", file=sys.stderr)

    @contextlib.contextmanager
    def tick() -> Iterator[None]:
        yield
        bar.update(1)

    with around(speed, "run_once", tick):
        for batch in batches:
            rows += speed.bench_cell(model, configs, random_ids(vocab, batch, prompt, device, seed=2), options)
    bar.close()
    for r in rows:  # half the range of the repetitions, relative to their median (None: one repetition)
        for phase in ("prefill", "decode"):
            times = r[f"{phase}_s"]
            r[f"{phase}_spread"] = (max(times) - min(times)) / 2 / statistics.median(times) if len(times) > 1 else None
    return rows


def speed_table(rows: list[dict[str, Any]]) -> str:
    headers = ["batch", "prompt", "config", "skipped compute", "prefill speedup", "ideal", "eff.", "spread",
               "decode speedup", "ideal", "eff.", "spread", "decode tok/s"]
    lines = [(r["batch"], r["prompt"], r["config"], f"{r['skipped_compute_prefill']:.1%}",
              f"{r['prefill_speedup']:.2f}", f"{r['prefill_ideal']:.2f}", f"{r['prefill_efficiency']:.2f}",
              spread(r["prefill_spread"]), f"{r['decode_speedup']:.2f}", f"{r['decode_ideal']:.2f}",
              f"{r['decode_efficiency']:.2f}", spread(r["decode_spread"]), f"{r['decode_tokens_per_s']:.1f}")
             for r in rows]
    return table(headers, lines)


def spread(value: float | None) -> str:
    return "-" if value is None else f"±{value:.0%}"


def speed_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's efficiency targets on the batch-1 rows of the target ratios."""
    targets = []
    for r in rows:
        ratio = r["config"].removeprefix("skip ")
        if r["batch"] != 1 or r["routing"] != "synthetic" or float(ratio) not in SPEED_TARGET_RATIOS:
            continue
        for key, need in SPEED_TARGETS.items():
            targets.append({"target": f"batch 1, skip {ratio}: {key.replace('_', ' ')} >= {need}",
                            "value": f"{r[key]:.2f}", "holds": r[key] >= need})
    return targets


# ---------------------------------------------------------------------------------------------
# The run: fit + tune + eval + generate on one device.


@dataclass
class RunSettings:
    """What ``--run`` does (the command line's options; their defaults live there)."""

    steps: int
    batch: int  # tuning micro-batch
    seq: int  # tuning sequence length
    fit_tokens: int | None  # None: the package's count (fit_sequence_count)
    checkpointing: bool
    calibrate: bool
    eval_tokens: int
    prompt: int
    new_tokens: int
    ratios: tuple[float, ...]
    reps: int


def tune_step_seconds(log: Path) -> list[float]:
    """Seconds of each tuning step, from the loop's JSONL log (elapsed time at every step)."""
    elapsed = [json.loads(line)["elapsed_s"] for line in log.read_text().splitlines() if line.strip()]
    return [b - a for a, b in zip([0.0, *elapsed], elapsed)]


def run_pipeline(shape: str, device: str, dtype: torch.dtype, s: RunSettings, layers: int | None = None) -> dict[str, Any]:
    """Build, attach routers, fit + tune, check activations, evaluate, time generation."""
    monitor = Monitor(device)
    config = model_config(shape, layers)
    with monitor.phase("build"):
        model = build_model(config, device, dtype)
    attach_routers(model, RouterConfig())
    d = Dims.of(config, routing_state(model).config)
    fit_sequences = fit_sequence_count(model, math.ceil(s.fit_tokens / s.seq) if s.fit_tokens else None, s.seq)
    cfg = TuneConfig(steps=s.steps, batch_size=s.batch, seq_len=s.seq, fit_sequences=fit_sequences, calibrate=s.calibrate,
                     gradient_checkpointing=s.checkpointing, save_every=s.steps)
    estimate = tune_peak_estimate(model, d, s)
    base = sum(p.numel() for n, p in model.named_parameters() if ".skip_routers." not in n)
    print(f"the plan's formulas: tuning needs about {size(estimate)} here (the RSS target: {size(rss_target(2 * base))})",
          file=sys.stderr)
    train_ids = random_ids(config.vocab_size, max(fit_sequences, s.steps * s.batch), s.seq)
    calib_ids = random_ids(config.vocab_size, cfg.calib_sequences, min(cfg.calib_seq_len, s.eval_tokens), seed=3) if s.calibrate else None

    def fit_phase() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(monitor.phase("fit"))
        stack.enter_context(layer_progress(model, fit_sequences * s.seq, "fit", observed=True))
        return stack

    with tempfile.TemporaryDirectory() as out, monitor.phase("tune_routers"), \
            around(tune_module, "fit_replacements", fit_phase), \
            around(tune_module, "calibrate_threshold", lambda: monitor.phase("calibrate")):
        results = tune_module.tune_routers(model, train_ids, cfg, out, calib_ids=calib_ids, progress=True)
        step_s = tune_step_seconds(Path(out) / LOG_NAME)
    with monitor.phase("activation check"):
        activations = activation_record(model, d, s, cfg, train_ids[: s.batch].to(device))
    text = " ".join(map(str, random_ids(config.vocab_size, 1, s.eval_tokens, seed=4)[0].tolist()))
    with monitor.phase("eval"), layer_progress(model, s.eval_tokens, "eval"):
        evaluation = perplexity(model, IdTokenizer(), text, seq_len=s.eval_tokens, progress=False)
    detach_routers(model)
    with monitor.phase("generate"):
        rows = speed_rows(model, device, [1], s.prompt, s.new_tokens, s.ratios, s.reps)
    monitor.close()
    phases = {p.name: asdict(p) for p in monitor.phases}
    activations["tune_peak_estimate"] = estimate
    activations["tune_peak_device_measured"] = phases["tune_routers"]["device_peak"]
    activations["tune_peak_rss_measured"] = phases["tune_routers"]["rss_peak"]
    bf16_weights = 2 * sum(p.numel() for p in model.parameters())  # routers detached: the base model
    target, peak = rss_target(bf16_weights), peak_rss_bytes()
    return {
        "shape": shape, "layers": d.layers, "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "settings": asdict(s), "git": git_state(), "versions": versions(),
        "weight_bytes_bf16": bf16_weights,
        "rss_target": {"rule": RSS_TARGET, "bytes": target, "peak_rss": peak, "holds": peak <= target},
        "phases": phases,
        "fit_s": phases.get("fit", {}).get("seconds"), "fit": results.get("replacement_fit"),
        "calibration": results.get("calibration"),
        "tune_step_s": step_s, "tune_step_s_median": statistics.median(step_s[1:] or step_s),
        "eval": {"tokens": s.eval_tokens, "seconds": phases["eval"]["seconds"], "ppl_random_ids": evaluation["ppl"],
                 "sparsity": evaluation["sparsity"]},
        "activations": activations,
        "speed": rows,
    }


def tune_peak_estimate(model: torch.nn.Module, d: Dims, s: RunSettings) -> int:
    """The plan's formulas for this run's tuning on one device: weights and routers, optimizer
    state, and one step's activations."""
    router_params = sum(p.numel() for p in router_parameters(model))
    workload = Workload(batch=s.batch, seq=s.seq, elem=model.dtype.itemsize)
    return (tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()) + optimizer_bytes(router_params)
            + tune_activation_bytes(d, workload, s.batch, range(d.layers), True, s.checkpointing))


def activation_record(model: torch.nn.Module, d: Dims, s: RunSettings, cfg: TuneConfig, batch: torch.Tensor) -> dict[str, Any]:
    """The tuned model's saved activations, measured and by the formulas (not under checkpointing,
    whose layers keep their inputs only and recompute the rest)."""
    prepare_for_tuning(model)
    measured = measured_saved_bytes(model, batch, cfg)
    model.eval()
    estimated = None if s.checkpointing else estimated_saved_bytes(d, model.dtype.itemsize, s.batch, s.seq)
    return {"measured_saved": measured, "estimated_saved": estimated,
            "ratio": None if estimated is None else estimated / measured}


# ---------------------------------------------------------------------------------------------
# Reports.


def git_state() -> dict[str, Any]:
    """The commit and whether the tree had changes (None where there is no git checkout)."""
    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f}"


def size(n: int | None) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def targets_text(targets: list[dict[str, Any]]) -> str:
    return "\n".join(f"* {t['target']}: {t['value']} -> {'holds' if t['holds'] else 'DOES NOT HOLD'}" for t in targets)


def plan_report(rows: list[dict[str, Any]], checks: list[dict[str, Any]], w: Workload, gpu_bytes: int, reserve: int) -> str:
    headers = ["shape", "GPUs", "layers per GPU", "embed / head", "weights/GPU", "tune act. (ckpt)", "optimizer", "fit",
               "KV cache", "eval act.", "tune peak (ckpt)", "eval peak", "fits tune (ckpt)", "fits eval",
               "max batch (ckpt)"]
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    lines = []
    for r in rows:
        on = lambda device: f"GPU {device}" if isinstance(device, int) else device  # noqa: E731
        lines.append((r["shape"], r["gpus"], "/".join(map(str, r["layers_per_gpu"])) + (" + disk" if r["offloaded"] else ""),
                      f"{on(r['embeddings_on'])} / {on(r['head_on'])}", gib(r["weights"]),
                      f"{gib(r['activations'])} ({gib(r['activations_checkpointing'])})", gib(r["optimizer"]), gib(r["fit"]),
                      gib(r["kv"]), gib(r["eval_working"]), f"{gib(r['tune_peak'])} ({gib(r['tune_peak_checkpointing'])})",
                      gib(r["eval_peak"]), f"{yes(r['fits_tune'])} ({yes(r['fits_tune_checkpointing'])})",
                      yes(r["fits_eval"]), f"{r['max_batch']} ({r['max_batch_checkpointing']})"))
    check_lines = [(c["shape"], c["layers"], c["dtype"], c["batch"], c["seq"], f"{c['estimated'] / 2**20:.2f}",
                    f"{c['measured'] / 2**20:.2f}", f"{c['ratio']:.3f}") for c in checks]
    title = (f"Memory plan: bf16 weights, seq {w.seq}, tuning batch {w.batch}, KV cache of {w.kv_batch} x "
             f"({w.seq} + {w.new_tokens}) tokens, evaluation batch {w.eval_batch}; GPUs of {gpu_bytes / 1e9:.0f} GB "
             f"with {gib(reserve)} GiB kept free. GiB per GPU, the largest over the GPUs; (ckpt): with activation "
             f"checkpointing; peaks: tune = weights + max(fit, activations + optimizer), eval = weights + KV + eval act.")
    parts = [title, table(headers, lines), "Targets:\n" + targets_text(plan_targets(rows, w.batch))]
    if checks:
        parts.append("Activation estimate against saved-tensor bytes of one real tuning step (CPU), MiB:\n"
                     + table(["shape", "layers", "dtype", "batch", "seq", "estimated", "measured", "est./meas."], check_lines))
    return "\n\n".join(parts) + "\n"


def run_report(r: dict[str, Any]) -> str:
    phases = [(name, f"{p['seconds']:.1f}", size(p["rss_peak"]), size(p["rss_end"]), size(p["device_peak"]))
              for name, p in r["phases"].items()]
    a, t, s = r["activations"], r["rss_target"], r["settings"]
    lines = [
        f"{r['shape']} ({r['layers']} layers), {r['dtype']}, {r['device']}, torch {r['versions']['torch']}; git {r['git']['commit']}"
        + (" (dirty tree)" if r["git"]["dirty"] else ""),
        "Phases (\"tune_routers\" is the whole call: the fit and calibration inside it are also listed alone):\n"
        + table(["phase", "seconds", "RSS peak", "RSS after", "GPU peak"], phases),
        f"tuning: {s['steps']} steps of batch {s['batch']} x seq {s['seq']}"
        + (" (activation checkpointing)" if s["checkpointing"] else "")
        + f": {r['tune_step_s_median']:.2f} s per step (median after the first; all: "
        + ", ".join(f"{x:.2f}" for x in r["tune_step_s"]) + ")",
        f"fit: {r['fit_s'] or 0:.1f} s ({r['fit'] and r['fit'].get('fit_tokens')} tokens); "
        f"eval: {r['eval']['tokens']} tokens in {r['eval']['seconds']:.1f} s",
        f"activations saved for backward in one tuning step: estimated {size(a['estimated_saved'])}, "
        f"measured {size(a['measured_saved'])}" + (f", estimate / measured {a['ratio']:.3f}" if a["ratio"] else ""),
    ]
    measured_peak = a["tune_peak_device_measured"]
    lines.append(f"tuning peak by the plan's formulas (weights, activations, optimizer): {size(a['tune_peak_estimate'])}; "
                 + (f"measured on the GPU: {size(measured_peak)}" if measured_peak is not None
                    else f"RSS peak in tune_routers: {size(a['tune_peak_rss_measured'])} (with the process's own ~0.4 GiB)"))
    lines.append(f"peak RSS {size(t['peak_rss'])}; target {t['rule']} = {size(t['bytes'])}: "
                 + ("holds" if t["holds"] else "DOES NOT HOLD"))
    lines.append(f"generation: {s['new_tokens']} greedy tokens after a {s['prompt']}-token prompt, median of {s['reps']} "
                 "(spread: half the max-min range / median)\n" + speed_table(r["speed"]))
    return "\n\n".join(lines) + "\n"


def write_outputs(stem: Path, text: str, data: dict[str, Any]) -> None:
    print(text)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(text)  # not with_suffix: a stem like "llama-3.2-1b" has a dot
    write_json(Path(f"{stem}.json"), data)
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", dest="mode", action="store_const", const="plan", help="memory plan on the meta device")
    mode.add_argument("--run", dest="mode", action="store_const", const="run", help="fit + tune + eval + generate")
    mode.add_argument("--speed", dest="mode", action="store_const", const="speed", help="prefill / decode timing")
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help=f"repeatable for --plan (default {', '.join(PLAN_SHAPES)})")
    p.add_argument("--layers", type=int, help="override the shape's depth (quick looks; not the real model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--out", help="output stem (writes STEM.json and STEM.md)")
    plan = p.add_argument_group("--plan")
    plan.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (accelerate's sizes: 80GB, 80GiB)")
    plan.add_argument("--reserve", default="2GiB", help="kept free per GPU: CUDA context and allocator slack")
    plan.add_argument("--seq", type=int, default=2048, help="sequence length of tuning, evaluation and the KV cache")
    plan.add_argument("--batch", type=int, default=4, help="tuning micro-batch of the table")
    plan.add_argument("--kv-batch", type=int, default=8, help="sequences generating at once (KV cache)")
    plan.add_argument("--no-check", action="store_true", help="skip the measured activation check on small shapes")
    run = p.add_argument_group("--run and --speed")
    run.add_argument("--steps", type=int, default=5)
    run.add_argument("--tune-batch", type=int, default=1)
    run.add_argument("--tune-seq", type=int, default=256)
    run.add_argument("--fit-tokens", type=int, help="tokens of the replacement fit (default: the package's, "
                     "max(8192, 4 x hidden) tokens)")
    run.add_argument("--checkpointing", action="store_true", help="activation checkpointing while tuning")
    run.add_argument("--calibrate", action="store_true", help="calibrate the threshold after tuning")
    run.add_argument("--eval-tokens", type=int, default=2048)
    run.add_argument("--prompt", type=int, help="prompt tokens for the speed rows (default: 128 for --run, 2048 for --speed)")
    run.add_argument("--new-tokens", type=int, default=64)
    run.add_argument("--batches", default="1,8", help="--speed: decode batch sizes")
    run.add_argument("--ratios", help="synthetic skip ratios (default: 0.25 for --run, 0.25,0.40,0.60 for --speed)")
    run.add_argument("--reps", type=int, help="timed repetitions after a warm-up (default: 2 for --run, 3 for --speed)")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    shapes = args.shape or []
    args.mode = args.mode or ("plan" if not shapes or all(s in PLAN_SHAPES for s in shapes) else "run")
    args.shape = shapes or (list(PLAN_SHAPES) if args.mode == "plan" else ["llama-3.2-1b"])
    if args.mode != "plan" and len(args.shape) != 1:
        p.error(f"--{args.mode} takes one --shape")
    return args


def default_stem(args: argparse.Namespace) -> Path:
    """docs/results for real shapes, runs/ for tiny or truncated ones."""
    if args.mode == "plan":
        name = "scale_plan" if set(args.shape) == set(PLAN_SHAPES) and not args.layers else "scale_plan_" + "_".join(args.shape)
    else:
        kind = torch.device(args.device).type
        name = f"scale_{'speed_' if args.mode == 'speed' else ''}{kind}_{args.shape[0]}" + (f"_{args.layers}l" if args.layers else "")
    real = not args.layers and "tiny" not in args.shape
    return ROOT / ("docs/results" if real else "runs") / name


def main_plan(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    w = Workload(batch=args.batch, seq=args.seq, kv_batch=args.kv_batch, new_tokens=args.new_tokens)
    gpu_bytes, reserve = convert_file_size_to_int(args.gpu_memory), convert_file_size_to_int(args.reserve)
    rows = []
    for shape in tqdm(args.shape, desc="plan", unit="shape", file=sys.stderr):
        rows += plan_rows(shape, w, gpu_bytes, reserve, args.layers)
    checks = [] if args.no_check else [
        activation_check("tiny", torch.bfloat16, batch=2, seq=64),
        activation_check("tiny", torch.float32, batch=2, seq=64, layers=4),
        activation_check("llama-3.2-1b", torch.bfloat16, batch=1, seq=1024, layers=2),  # several logit chunks, as the rows
    ]
    text = plan_report(rows, checks, w, gpu_bytes, reserve)
    data = {"workload": asdict(w), "gpu_bytes": gpu_bytes, "reserve_bytes": reserve, "rows": rows,
            "targets": plan_targets(rows, w.batch), "activation_checks": checks, "git": git_state(), "versions": versions()}
    return text, data


def main_speed(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    model = build_model(model_config(args.shape[0], args.layers), args.device, DTYPES[args.dtype])
    ratios = [float(r) for r in (args.ratios or "0.25,0.40,0.60").split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = speed_rows(model, args.device, batches, args.prompt or 2048, args.new_tokens, ratios, args.reps or 3)
    targets = speed_targets(rows)
    title = (f"{args.shape[0]}, {args.dtype}, {device_name(args.device)}: prompt {args.prompt or 2048}, "
             f"{args.new_tokens} new tokens, median of {args.reps or 3} (spread: half the max-min range / median)")
    text = f"{title}\n\n{speed_table(rows)}\n\nTargets:\n{targets_text(targets)}\n"
    return text, {"shape": args.shape[0], "device": device_name(args.device), "dtype": args.dtype, "rows": rows,
                  "targets": targets, "git": git_state(), "versions": versions()}


def main_run(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    settings = RunSettings(steps=args.steps, batch=args.tune_batch, seq=args.tune_seq, fit_tokens=args.fit_tokens,
                           checkpointing=args.checkpointing, calibrate=args.calibrate, eval_tokens=args.eval_tokens,
                           prompt=args.prompt or 128, new_tokens=args.new_tokens,
                           ratios=tuple(float(r) for r in (args.ratios or "0.25").split(",")), reps=args.reps or 2)
    result = run_pipeline(args.shape[0], args.device, DTYPES[args.dtype], settings, args.layers)
    return run_report(result), result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text, data = {"plan": main_plan, "speed": main_speed, "run": main_run}[args.mode](args)
    write_outputs(Path(args.out) if args.out else default_stem(args), text, data)
    return data


if __name__ == "__main__":
    main()
