"""Width pruning baselines: SliceGPT and LLM-Pruner (paper section 4.2, appendix C).

Both keep every layer and make the matrices inside them smaller; nothing is masked.

* **SliceGPT** (Ashkboos et al. 2024). RMSNorm scales are folded into the linear layers that
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
* **LLM-Pruner** (Ma et al. 2023), block-wise: dependency groups (one KV head with its query
  heads: q/k/v rows and o columns; one MLP channel: gate/up rows and the down column) ranked
  by first-order Taylor importance ``sum |w * dL/dw|`` over the group's weights ("param_first",
  group reduction "sum") from calibration gradients, and the lowest groups removed at one
  per-layer rate in the layers LLM-Pruner prunes (layers 4..29 of 32, scaled to the depth).

SliceGPT supports the llama family (llama, mistral, qwen2, qwen3); LLM-Pruner also Gemma 2/3.
Torch-Pruning, the library LLM-Pruner is built on, is not used: building its dependency groups
did not finish on a tiny GQA Llama (docs/baselines-width.md), so the groups are written out here.
"""

from __future__ import annotations

import time
import types
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..routing.adapters import get_adapter
from ..errors import SkipGPTError
from ..routing.surgery import has_routers
from .registry import StaticMethod, register
from .structure import PrunePlan, decoder_parameter_count

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
LLM_PRUNER_TYPES = (*LLAMA_FAMILY, "gemma2", "gemma3_text")  # head/channel groups do not care about norms
ATTN_IN, ATTN_OUT = ("q_proj", "k_proj", "v_proj"), "o_proj"
MLP_IN, MLP_OUT = ("gate_proj", "up_proj"), "down_proj"
SLICEGPT_ROUND_INTERVAL = 8  # SliceGPT's --round-interval default


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_model(model: nn.Module, method: str, types_ok: tuple[str, ...]) -> None:
    get_adapter(model)  # unknown architectures fail with the list of supported ones
    model_type = model.config.model_type
    if model_type not in types_ok:
        raise SkipGPTError(
            f"{method} is implemented for the llama family ({', '.join(types_ok)}), not {model_type!r}: "
            "Gemma 2/3 normalise each branch's output before the residual add, so the RMSNorm scales "
            "cannot be folded and the residual stream cannot be rotated (SliceGPT does not support Gemma either)"
            if method == "slicegpt"
            else f"{method} supports {', '.join(types_ok)}, not {model_type!r}"
        )
    if has_routers(model):
        raise SkipGPTError("remove routers (detach_routers) before pruning; routed and pruned models are separate baselines")
    if getattr(model, "skipgpt_prune_plan", None) is not None:
        raise SkipGPTError(f"this model is already pruned ({model.skipgpt_prune_plan.method}); start from the base model")
    for layer in get_adapter(model).decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        names = [n for n in (*ATTN_IN, ATTN_OUT) if not isinstance(getattr(attn, n, None), nn.Linear)]
        names += [n for n in (*MLP_IN, MLP_OUT) if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if names:
            raise SkipGPTError(f"{method}: expected separate nn.Linear projections, missing {names} in {model_type}")


def _shrink_linear(linear: nn.Linear, rows: Any = None, cols: Any = None) -> None:
    """Keep only ``rows`` (output features) and ``cols`` (input features) of a linear layer:
    new, smaller parameters, so the removed weights really leave the model."""
    with torch.no_grad():
        weight = linear.weight
        if rows is not None:
            weight = weight[rows]
        if cols is not None:
            weight = weight[:, cols]
        grad = linear.weight.requires_grad
        linear.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=grad)
        if linear.bias is not None and rows is not None:
            linear.bias = nn.Parameter(linear.bias[rows].detach().clone().contiguous(), requires_grad=grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _set_weight(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    grad = linear.weight.requires_grad
    dtype = linear.weight.dtype
    linear.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors once


def _finish(model: nn.Module, plan: PrunePlan, before: int, total_before: int, start: float) -> PrunePlan:
    after = decoder_parameter_count(model)
    total_after = _total_params(model)
    plan.achieved_ratio = 1 - after / before
    plan.base_model = str(getattr(model.config, "_name_or_path", ""))
    plan.extra.update(
        decoder_params_before=before,
        decoder_params_after=after,
        total_params_before=total_before,
        total_params_after=total_after,
        total_ratio=1 - total_after / total_before,
        prune_wall_s=round(time.perf_counter() - start, 2),
    )
    model.skipgpt_prune_plan = plan
    return plan


# ---------------------------------------------------------------------------------------------
# SliceGPT


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
        _set_weight(linear, linear.weight.double() @ q[:, :sliced])
    shortcut = q.T[:sliced, :]  # back to the original basis for the PCA below
    setattr(layer, shortcut_name, nn.Parameter(shortcut.to(dtype)))
    outputs = run_half([(x.double() @ q[:, :sliced]).to(dtype) for x in inputs])
    q_next, values = _pca(outputs)
    setattr(layer, shortcut_name, nn.Parameter((shortcut @ q_next[:, :out]).to(dtype)))
    proj = getattr(module, out_name)
    _set_weight(proj, (q_next.T @ proj.weight.double())[:out],
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
                model(input_ids=batch.to(_device(model)), use_cache=False)
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
    _check_model(model, "slicegpt", LLAMA_FAMILY)
    if not 0 <= ratio < 1:
        raise SkipGPTError(f"the pruning ratio must be in [0, 1), got {ratio}")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    config = model.config.get_text_config()
    dim = config.hidden_size
    if round_interval is None:
        round_interval = SLICEGPT_ROUND_INTERVAL if dim % SLICEGPT_ROUND_INTERVAL == 0 and dim >= 256 else 1
    before, total_before = decoder_parameter_count(model), _total_params(model)
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
        _set_weight(head, head.weight.double() @ q[:, :out], None if head.bias is None else head.bias.double())

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
    return _finish(model, plan, before, total_before, start)


def restructure_slicegpt(model: nn.Module, plan: PrunePlan) -> None:
    """The sliced architecture on a fresh base model; every weight is then loaded from the file."""
    _check_model(model, "slicegpt", LLAMA_FAMILY)
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
            _shrink_linear(getattr(layer.self_attn, name), cols=keep)
        _shrink_linear(getattr(layer.self_attn, ATTN_OUT), rows=keep)
        for name in MLP_IN:
            _shrink_linear(getattr(layer.mlp, name), cols=keep)
        last_full = not slice_head and index == len(layers) - 1
        _shrink_linear(getattr(layer.mlp, MLP_OUT), rows=None if last_full else keep)
    embed = model.get_input_embeddings()
    embed.weight = nn.Parameter(embed.weight[:, keep].detach().clone(), requires_grad=embed.weight.requires_grad)
    embed.embedding_dim = sliced
    if slice_head:
        _shrink_linear(model.get_output_embeddings(), cols=keep)


# ---------------------------------------------------------------------------------------------
# LLM-Pruner


def llm_pruner_layers(num_layers: int) -> tuple[int, int]:
    """The block range LLM-Pruner prunes, [4, 30) of LLaMA-7B's 32 layers, scaled to the depth
    (first 1/8 and last 1/16 of the layers untouched)."""
    start = round(4 * num_layers / 32)
    end = num_layers - round(2 * num_layers / 32)
    return (start, end) if start < end else (0, num_layers)


def _attn_geometry(attn: nn.Module) -> tuple[int, int, int]:
    """(head_dim, KV heads, query heads per KV head), read from the weight shapes."""
    head_dim = int(attn.head_dim)
    kv = attn.k_proj.out_features // head_dim
    return head_dim, kv, attn.q_proj.out_features // head_dim // kv


def _group_rows(kv_heads: list[int] | torch.Tensor, head_dim: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q/o row (column) indices and k/v row indices of the given KV heads."""
    kv_heads = torch.as_tensor(kv_heads, dtype=torch.long)
    q_heads = (kv_heads[:, None] * group + torch.arange(group)).flatten()
    span = torch.arange(head_dim)
    return (q_heads[:, None] * head_dim + span).flatten(), (kv_heads[:, None] * head_dim + span).flatten()


def _unit_params(layer: nn.Module) -> tuple[int, int]:
    """Parameters of one attention group (KV head + its query heads) and of one MLP channel."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim, _, group = _attn_geometry(attn)
    per_q, per_kv = group * head_dim, head_dim
    head = per_q * attn.q_proj.in_features + 2 * per_kv * attn.k_proj.in_features + attn.o_proj.out_features * per_q
    head += sum(rows for lin, rows in ((attn.q_proj, per_q), (attn.k_proj, per_kv), (attn.v_proj, per_kv)) if lin.bias is not None)
    channel = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    channel += sum(1 for lin in (mlp.gate_proj, mlp.up_proj) if lin.bias is not None)
    return head, channel


def taylor_group_importance(
    model: nn.Module, calib_ids: torch.Tensor, layer_ids: list[int], batch_size: int = 1
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (importance of each KV-head group, importance of each MLP channel), the sum of
    |w * dL/dw| over the group's weights, dL/dw from the calibration LM loss (mean over all
    sequences, accumulated batch by batch)."""
    layers = get_adapter(model).decoder_layers(model)
    targets = {i: [getattr(layers[i].self_attn, n) for n in (*ATTN_IN, ATTN_OUT)]
               + [getattr(layers[i].mlp, n) for n in (*MLP_IN, MLP_OUT)] for i in layer_ids}
    weights = [lin.weight for lins in targets.values() for lin in lins]
    flags = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        n = calib_ids.shape[0]
        for batch in tqdm(calib_ids.split(batch_size), desc="LLM-Pruner gradients", leave=False):
            batch = batch.to(_device(model))
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss * (batch.shape[0] / n)
            loss.backward()
        result = {}
        with torch.no_grad():
            for i, (q, k, v, o, gate, up, down) in targets.items():
                sal = {id(lin): (lin.weight.float() * lin.weight.grad.float()).abs() for lin in (q, k, v, o, gate, up, down)}
                head_dim, kv, group = _attn_geometry(layers[i].self_attn)
                rows = lambda lin: sal[id(lin)].sum(1)  # noqa: E731  (per output feature)
                cols = lambda lin: sal[id(lin)].sum(0)  # noqa: E731  (per input feature)
                per_q = (rows(q) + cols(o)).view(kv, group * head_dim).sum(1)
                per_kv = (rows(k) + rows(v)).view(kv, head_dim).sum(1)
                channels = rows(gate) + rows(up) + cols(down)
                result[i] = ((per_q + per_kv).cpu(), channels.cpu())
    finally:
        for w in weights:
            w.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)
    return result


def _choose_rate(layers: nn.ModuleList, layer_ids: list[int], ratio: float, before: int) -> tuple[float, int, int, float]:
    """One rate r for every pruned layer: round(r * KV heads) head groups and round(r * channels)
    MLP channels go, r chosen so the decoder-layer ratio is closest to the request (at least one
    group and one channel stay). Returns (r, heads pruned, channels pruned, ratio step of one
    channel per layer)."""
    layer = layers[layer_ids[0]]
    _, kv, _ = _attn_geometry(layer.self_attn)
    channels = layer.mlp.gate_proj.out_features
    for i in layer_ids:  # uniform layers (true of every supported family)
        if _attn_geometry(layers[i].self_attn)[1] != kv or layers[i].mlp.gate_proj.out_features != channels:
            raise SkipGPTError("llm-pruner expects every pruned layer to have the same number of heads and channels")
    head_p, chan_p = _unit_params(layer)
    rates = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    n_heads = torch.round(rates * kv).clamp(max=kv - 1)
    n_chan = torch.round(rates * channels).clamp(max=channels - 1)
    achieved = len(layer_ids) * (n_heads * head_p + n_chan * chan_p) / before
    best = int(torch.argmin((achieved - ratio).abs() + rates * 1e-12))  # ties: the smaller rate
    return float(rates[best]), int(n_heads[best]), int(n_chan[best]), len(layer_ids) * chan_p / before


def _apply_llm_pruner(model: nn.Module, kept: dict[str, dict[str, list[int]]]) -> None:
    layers = get_adapter(model).decoder_layers(model)
    for key, keep in kept.items():
        layer = layers[int(key)]
        attn, mlp = layer.self_attn, layer.mlp
        head_dim, kv, group = _attn_geometry(attn)
        q_rows, kv_rows = _group_rows(keep["kv_heads"], head_dim, group)
        _shrink_linear(attn.q_proj, rows=q_rows)
        _shrink_linear(attn.k_proj, rows=kv_rows)
        _shrink_linear(attn.v_proj, rows=kv_rows)
        _shrink_linear(attn.o_proj, cols=q_rows)
        channels = torch.as_tensor(keep["channels"], dtype=torch.long)
        _shrink_linear(mlp.gate_proj, rows=channels)
        _shrink_linear(mlp.up_proj, rows=channels)
        _shrink_linear(mlp.down_proj, cols=channels)
        # transformers reshapes with -1 heads and head_dim; keep the bookkeeping attributes true
        n_kv = len(keep["kv_heads"])
        for name, value in (("num_heads", n_kv * group), ("num_key_value_heads", n_kv)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep["channels"])


def prune_llm_pruner(
    model: nn.Module,
    calib_ids: torch.Tensor,
    ratio: float,
    *,
    layer_range: tuple[int, int] | None = None,
    batch_size: int = 1,
) -> PrunePlan:
    """LLM-Pruner block-wise with Taylor param_first importance, per-layer rate set so that the
    decoder-layer parameter ratio is closest to ``ratio``."""
    start_time = time.perf_counter()
    _check_model(model, "llm-pruner", LLM_PRUNER_TYPES)
    if not 0 <= ratio < 1:
        raise SkipGPTError(f"the pruning ratio must be in [0, 1), got {ratio}")
    layers = get_adapter(model).decoder_layers(model)
    start, end = layer_range or llm_pruner_layers(len(layers))
    if not 0 <= start < end <= len(layers):
        raise SkipGPTError(f"layer range [{start}, {end}) is outside the model's {len(layers)} layers")
    layer_ids = list(range(start, end))
    before, total_before = decoder_parameter_count(model), _total_params(model)
    rate, n_heads, n_chan, step = _choose_rate(layers, layer_ids, ratio, before)
    importance = taylor_group_importance(model, calib_ids, layer_ids, batch_size) if ratio > 0 else {}
    head_dim, kv, group = _attn_geometry(layers[start].self_attn)
    kept: dict[str, dict[str, list[int]]] = {}
    for i in layer_ids:
        channels = layers[i].mlp.gate_proj.out_features
        if i in importance:
            head_imp, chan_imp = importance[i]
            heads = sorted(head_imp.argsort(descending=True)[: kv - n_heads].tolist())
            chans = sorted(chan_imp.argsort(descending=True)[: channels - n_chan].tolist())
        else:
            heads, chans = list(range(kv)), list(range(channels))
        kept[str(i)] = {"kv_heads": heads, "channels": chans}
    _apply_llm_pruner(model, kept)
    plan = PrunePlan(
        method="llm-pruner",
        target_ratio=ratio,
        extra={
            "layer_range": [start, end],
            "rate": rate,
            "kv_heads_pruned_per_layer": n_heads,
            "channels_pruned_per_layer": n_chan,
            "query_heads_per_kv_head": group,
            "head_dim": head_dim,
            "ratio_step": step,
            "importance": "Taylor param_first: sum over the group's weights of |w * dL/dw| (group reduction sum)",
            "calibration": list(calib_ids.shape),
            "kept": kept,
        },
    )
    return _finish(model, plan, before, total_before, start_time)


def restructure_llm_pruner(model: nn.Module, plan: PrunePlan) -> None:
    """Pruned shapes on a fresh base model by indexing its own weights: nothing is saved."""
    _check_model(model, "llm-pruner", LLM_PRUNER_TYPES)
    _apply_llm_pruner(model, plan.extra["kept"])


register(StaticMethod(
    name="slicegpt",
    description="SliceGPT: fold RMSNorm scales, rotate the residual stream into its calibration PCA basis "
                "and delete the least significant hidden dimensions (width)",
    prune=prune_slicegpt,
    restructure=restructure_slicegpt,
    granularity="width",
))
register(StaticMethod(
    name="llm-pruner",
    description="LLM-Pruner: remove KV-head groups and MLP channels with the lowest first-order Taylor "
                "importance in the middle layers (width)",
    prune=prune_llm_pruner,
    restructure=restructure_llm_pruner,
    granularity="width",
))
