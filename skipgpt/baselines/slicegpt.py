"""SliceGPT, a width pruning baseline.

**SliceGPT** (Ashkboos et al. 2024). RMSNorm scales are folded into the linear layers that
  read the normalised signal, so every norm becomes the scale-free RMSNorm that commutes with
  orthogonal maps. The residual stream is then rotated, one point at a time, into the principal
  components of its calibration signal and the trailing ``d - d'`` components are deleted:
  embedding columns, q/k/v/gate/up input columns, o/down output rows and lm_head input columns
  all shrink from ``d`` to ``d'``. Each point has its own basis (layer inputs, the signal
  between attention and MLP), so the residual of each branch passes through a ``d' x d'``
  shortcut matrix ``Q_a^T Q_b`` (``attn_shortcut_Q``, ``mlp_shortcut_Q``: real parameters,
  counted in the ratio, as in the paper). Computed sequentially as in SliceGPT's
  ``rotate_and_slice_sequential``: each PCA sees the signal of the already sliced layers.
  RMSNorm still divides by the original ``d``.
"""

from __future__ import annotations

import time
import types
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SkipGPTError
from ..routing.adapters import get_adapter
from .registry import StaticMethod, register
from .structure import PrunePlan, decoder_parameter_count
from .width import (
    ATTN_IN,
    ATTN_OUT,
    LLAMA_FAMILY,
    MLP_IN,
    MLP_OUT,
    check_model,
    device_of,
    finish,
    set_weight,
    shrink_linear,
    total_params,
)

SLICEGPT_ROUND_INTERVAL = 8  # SliceGPT's --round-interval default




class SlicedRMSNorm(nn.Module):
    """RMSNorm whose scale has been folded into the next linear layers. It still divides by the
    original width ``mean_dim`` (SliceGPT's ``RMSN``), so on a sliced, rotated signal it gives
    the rotated-and-sliced output of the original norm."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.eps = float(eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        variance = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(variance + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


def _attn_half(layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)[0]
    return hidden_states @ layer.attn_shortcut_Q.to(hidden_states.dtype) + out


def _mlp_half(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    out = layer.mlp(layer.post_attention_layernorm(hidden_states))
    return hidden_states @ layer.mlp_shortcut_Q.to(hidden_states.dtype) + out


def _sliced_layer_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The pre-norm layer with each residual passed through its shortcut matrix."""
    return _mlp_half(self, _attn_half(self, hidden_states, kwargs))


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise SkipGPTError(f"cannot read the epsilon of {type(norm).__name__}")


def _untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own weight (SliceGPT rotates the embedding and the head differently)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
    return tied


def _install_sliced_layers(model: nn.Module, dim: int, sliced: int, eps: float, slice_head: bool = True) -> None:
    """Scale-free norms, shortcut matrices (identity for now) and the shortcut forward. Without
    ``slice_head`` the last layer's output (its MLP shortcut columns) keeps the full width."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    for index, layer in enumerate(layers):
        layer.input_layernorm = SlicedRMSNorm(dim, eps)
        layer.post_attention_layernorm = SlicedRMSNorm(dim, eps)
        dtype, device = layer.self_attn.q_proj.weight.dtype, layer.self_attn.q_proj.weight.device
        out = dim if not slice_head and index == len(layers) - 1 else sliced
        layer.attn_shortcut_Q = nn.Parameter(torch.eye(sliced, dtype=dtype, device=device))
        layer.mlp_shortcut_Q = nn.Parameter(torch.eye(sliced, out, dtype=dtype, device=device))
        layer.forward = types.MethodType(_sliced_layer_forward, layer)
    parent = model.get_submodule(adapter.layers.rsplit(".", 1)[0])
    parent.norm = SlicedRMSNorm(dim, eps)


def _slicegpt_decoder_count(model: nn.Module, sliced: int, slice_head: bool = True) -> int:
    """Decoder-layer parameters after slicing the hidden size to ``sliced`` (norm scales gone,
    two ``sliced x sliced`` shortcut matrices per layer added; without ``slice_head`` the last
    layer's down_proj and MLP shortcut keep full-width outputs)."""
    total = 0
    layers = get_adapter(model).decoder_layers(model)
    dim = model.config.get_text_config().hidden_size
    for index, layer in enumerate(layers):
        out = dim if not slice_head and index == len(layers) - 1 else sliced
        attn, mlp = layer.self_attn, layer.mlp
        inputs = [getattr(attn, n) for n in ATTN_IN] + [getattr(mlp, n) for n in MLP_IN]
        outputs = [getattr(attn, ATTN_OUT), getattr(mlp, MLP_OUT)]
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        touched = {id(p) for m in (*inputs, *outputs, *norms) for p in m.parameters()}
        total += sum(p.numel() for p in layer.parameters() if id(p) not in touched)
        total += sum(m.out_features * sliced + (m.bias.numel() if m.bias is not None else 0) for m in inputs)
        total += sliced * outputs[0].in_features + (sliced if outputs[0].bias is not None else 0)
        total += out * outputs[1].in_features + (out if outputs[1].bias is not None else 0)
        total += sliced * sliced + sliced * out
    return total


def _choose_sliced_dim(model: nn.Module, ratio: float, round_interval: int, slice_head: bool) -> tuple[int, float]:
    """The sliced width (a multiple of ``round_interval``) whose decoder-layer ratio is closest
    to ``ratio``, and the ratio change of one step there. Ratio 0 means no slicing at all."""
    dim = model.config.get_text_config().hidden_size
    before = decoder_parameter_count(model)
    ratio_of = lambda d: 1 - _slicegpt_decoder_count(model, d, slice_head) / before  # noqa: E731
    if ratio == 0:
        return dim, ratio_of(dim - round_interval) - ratio_of(dim)
    candidates = list(range(round_interval, dim + 1, round_interval))
    best = min(candidates, key=lambda d: (abs(ratio_of(d) - ratio), -d))
    lower = max(best - round_interval, round_interval)
    step = abs(ratio_of(lower) - ratio_of(best)) if lower != best else abs(ratio_of(best + round_interval) - ratio_of(best))
    return best, step


@torch.no_grad()
def _rotate_and_slice_half(layer: nn.Module, module: nn.Module, in_names: tuple[str, ...], out_name: str,
                           shortcut_name: str, q: torch.Tensor, inputs: list[torch.Tensor], sliced: int, out: int,
                           run_half: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """Rotate and slice one residual half (attention or MLP) of a SliceGPT layer.

    Its input projections read the ``sliced`` leading directions of basis ``q``; its outputs on the
    calibration text (computed through the new shortcut) give the next basis by PCA, into which
    its output projection and shortcut write ``out`` directions. Returns the half's outputs, the
    next basis and the share of variance the kept directions hold.
    """
    dtype = getattr(module, in_names[0]).weight.dtype
    for name in in_names:
        linear = getattr(module, name)
        set_weight(linear, linear.weight.double() @ q[:, :sliced])
    shortcut = q.T[:sliced, :]  # back to the original basis for the PCA below
    setattr(layer, shortcut_name, nn.Parameter(shortcut.to(dtype)))
    outputs = run_half([(x.double() @ q[:, :sliced]).to(dtype) for x in inputs])
    q_next, values = _pca(outputs)
    setattr(layer, shortcut_name, nn.Parameter((shortcut @ q_next[:, :out]).to(dtype)))
    proj = getattr(module, out_name)
    set_weight(proj, (q_next.T @ proj.weight.double())[:out],
                None if proj.bias is None else (proj.bias.double() @ q_next)[:out])
    return outputs, q_next, float(values[:sliced].sum() / values.sum())


def _pca(signals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns, by decreasing eigenvalue) and eigenvalues of sum x x^T in float64,
    damped by 1% of the mean diagonal as SliceGPT's ``pca_calc``."""
    dim = signals[0].shape[-1]
    cov = torch.zeros(dim, dim, dtype=torch.float64, device=signals[0].device)
    for x in signals:
        x = x.reshape(-1, dim).double()
        cov += x.T @ x
    cov.diagonal().add_(0.01 * cov.diagonal().mean())
    values, vectors = torch.linalg.eigh(cov)
    order = values.argsort(descending=True)
    return vectors[:, order], values[order]


class _StopForward(Exception):
    pass


@torch.no_grad()
def _layer0_inputs(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) entering the first decoder layer, per batch."""
    layer0 = get_adapter(model).decoder_layers(model)[0]
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), dict(kwargs)))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device_of(model)), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def prune_slicegpt(
    model: nn.Module,
    calib_ids: torch.Tensor,
    ratio: float,
    *,
    round_interval: int | None = None,
    slice_head: bool = True,
    batch_size: int = 1,
) -> PrunePlan:
    """SliceGPT with the sliced width chosen so that the decoder-layer parameter ratio (shortcut
    matrices included) is closest to ``ratio``; ``ratio=0`` only rotates. ``slice_head=False``
    is SliceGPT's own default (``do_slice_head``): the last layer's output and lm_head keep the
    full width."""
    start = time.perf_counter()
    check_model(model, "slicegpt", LLAMA_FAMILY)
    if not 0 <= ratio < 1:
        raise SkipGPTError(f"the pruning ratio must be in [0, 1), got {ratio}")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    config = model.config.get_text_config()
    dim = config.hidden_size
    if round_interval is None:
        round_interval = SLICEGPT_ROUND_INTERVAL if dim % SLICEGPT_ROUND_INTERVAL == 0 and dim >= 256 else 1
    before, total_before = decoder_parameter_count(model), total_params(model)
    sliced, step = _choose_sliced_dim(model, ratio, round_interval, slice_head)
    eps = _norm_eps(layers[0].input_layernorm)
    final_norm = model.get_submodule(adapter.layers.rsplit(".", 1)[0]).norm

    # 1. signal entering layer 0 (the embeddings), captured before anything changes
    inputs = _layer0_inputs(model, calib_ids, batch_size)

    with torch.no_grad():
        # 2. fold RMSNorm scales into the linear layers that read the normalised signal
        untied = _untie_embeddings(model)
        for layer in layers:
            for norm, module, names in ((layer.input_layernorm, layer.self_attn, ATTN_IN),
                                        (layer.post_attention_layernorm, layer.mlp, MLP_IN)):
                for name in names:
                    linear = getattr(module, name)
                    linear.weight.mul_(norm.weight.to(linear.weight.dtype))
        head = model.get_output_embeddings()
        head.weight.mul_(final_norm.weight.to(head.weight.dtype))
        _install_sliced_layers(model, dim, dim, eps)  # identity shortcuts: the model is unchanged

        # 3. rotate and slice, point by point
        embed = model.get_input_embeddings()
        q, values = _pca([x for x, _ in inputs])
        kept_variance = [float(values[:sliced].sum() / values.sum())]
        embed.weight = nn.Parameter((embed.weight.double() @ q[:, :sliced]).to(embed.weight.dtype))
        embed.embedding_dim = sliced
        hidden = [x for x, _ in inputs]
        kwargs = [kw for _, kw in inputs]
        for index, layer in enumerate(tqdm(layers, desc="SliceGPT rotate+slice", leave=False)):
            out = dim if not slice_head and index == len(layers) - 1 else sliced
            # attention reads the layer input's basis q and writes the one between its two halves;
            # the MLP reads that one and writes the next layer's input basis
            mid, q_mid, kept = _rotate_and_slice_half(
                layer, layer.self_attn, ATTN_IN, ATTN_OUT, "attn_shortcut_Q", q, hidden, sliced, sliced,
                lambda xs: [_attn_half(layer, x, kw) for x, kw in zip(xs, kwargs)])
            kept_variance.append(kept)
            hidden, q, kept = _rotate_and_slice_half(
                layer, layer.mlp, MLP_IN, MLP_OUT, "mlp_shortcut_Q", q_mid, mid, sliced, out,
                lambda xs: [_mlp_half(layer, x) for x in xs])
            kept_variance.append(kept)
        set_weight(head, head.weight.double() @ q[:, :out], None if head.bias is None else head.bias.double())

    changed = [n for n, _ in model.named_parameters()]
    plan = PrunePlan(
        method="slicegpt",
        target_ratio=ratio,
        changed=changed,
        extra={
            "hidden_size": dim,
            "sliced_dim": sliced,
            "slicing": 1 - sliced / dim,
            "round_interval": round_interval,
            "slice_head": slice_head,
            "ratio_step": step,
            "untied_embeddings": untied,
            "norm_eps": eps,
            "shortcut_params": sum(layer.attn_shortcut_Q.numel() + layer.mlp_shortcut_Q.numel() for layer in layers),
            "kept_variance_mean": sum(kept_variance) / len(kept_variance),
            "calibration": list(calib_ids.shape),
        },
    )
    return finish(model, plan, before, total_before, start)


def restructure_slicegpt(model: nn.Module, plan: PrunePlan) -> None:
    """The sliced architecture on a fresh base model; every weight is then loaded from the file."""
    check_model(model, "slicegpt", LLAMA_FAMILY)
    extra = plan.extra
    dim, sliced = int(extra["hidden_size"]), int(extra["sliced_dim"])
    config = model.config.get_text_config()
    if config.hidden_size != dim:
        raise SkipGPTError(f"the plan was made on a model of hidden size {dim}, this one has {config.hidden_size}")
    if extra.get("untied_embeddings"):
        _untie_embeddings(model)
    slice_head = bool(extra.get("slice_head", True))
    _install_sliced_layers(model, dim, sliced, float(extra["norm_eps"]), slice_head)
    keep = slice(0, sliced)
    layers = get_adapter(model).decoder_layers(model)
    for index, layer in enumerate(layers):
        for name in ATTN_IN:
            shrink_linear(getattr(layer.self_attn, name), cols=keep)
        shrink_linear(getattr(layer.self_attn, ATTN_OUT), rows=keep)
        for name in MLP_IN:
            shrink_linear(getattr(layer.mlp, name), cols=keep)
        last_full = not slice_head and index == len(layers) - 1
        shrink_linear(getattr(layer.mlp, MLP_OUT), rows=None if last_full else keep)
    embed = model.get_input_embeddings()
    embed.weight = nn.Parameter(embed.weight[:, keep].detach().clone(), requires_grad=embed.weight.requires_grad)
    embed.embedding_dim = sliced
    if slice_head:
        shrink_linear(model.get_output_embeddings(), cols=keep)


register(StaticMethod(
    name="slicegpt",
    description="SliceGPT: fold RMSNorm scales, rotate the residual stream into its calibration PCA basis "
                "and delete the least significant hidden dimensions (width)",
    prune=prune_slicegpt,
    restructure=restructure_slicegpt,
    granularity="width",
    label="SliceGPT",
))
