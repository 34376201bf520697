"""Where each architecture keeps its layers, modules and norms.

Every supported decoder is a pre-norm residual stack; they differ only in names and in
whether a branch has a post-norm before the residual add (Gemma 2/3). One table describes
that, and a single routed forward (surgery.py) serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SkipGPTError

KINDS = ("attn", "mlp")  # the two routable branches of every layer; module index = 2·layer + KINDS.index(kind)


@dataclass(frozen=True)
class ArchAdapter:
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    # Mistral applies its config's sliding window to every layer; the others mark it per layer.
    window_in_config: bool = False

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def branch(self, layer: nn.Module, kind: str) -> tuple[nn.Module, nn.Module, nn.Module | None]:
        """(pre-norm, module, post-norm or None) of the attention or MLP branch."""
        norm, module, post = (
            (self.attn_norm, self.attn, self.attn_post_norm)
            if kind == "attn"
            else (self.mlp_norm, self.mlp, self.mlp_post_norm)
        )
        return getattr(layer, norm), getattr(layer, module), getattr(layer, post) if post else None


    def attention_window(self, attn: nn.Module) -> int | None:
        """The sliding window of this attention module (None: full causal attention)."""
        source = attn.config if self.window_in_config else attn
        return getattr(source, "sliding_window", None) or None


_PRE_NORM = ArchAdapter()
_SANDWICH_NORM = ArchAdapter(
    mlp_norm="pre_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
)

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _PRE_NORM,
    "mistral": ArchAdapter(window_in_config=True),
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
    "gemma2": _SANDWICH_NORM,
    "gemma3_text": _SANDWICH_NORM,
    "gemma3": ArchAdapter(**{**_SANDWICH_NORM.__dict__, "layers": "model.language_model.layers"}),
}


def get_adapter(model_or_type: nn.Module | str) -> ArchAdapter:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise SkipGPTError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(sorted(ADAPTERS))}. Adding one is an entry in skipgpt/routing/adapters.py."
        ) from None
