"""Router sets on disk, PEFT-style: ``router_config.json`` (architecture, threshold, the recipe
that trained them) and ``routers.safetensors`` (router and replacement weights only), loaded back
onto any copy of the base model they were trained on.

A router set is named by its directory, or by a builtin name (:data:`BUILTIN_ROUTERS`): sets
shipped inside the package for a builtin model, so that a new user evaluates and generates with a
tuned routed model at once, offline.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import RouterConfig
from ..errors import SkipGPTError
from ..files import atomic_write, write_json
from ..identity import weights_fingerprint
from .adapters import get_adapter
from .hub import exported_settings
from .surgery import attach_routers, detach_routers, routing_state

CONFIG_NAME = "router_config.json"
# Version 2 added replacements; a version-1 set was trained without them, whatever today's default.
FORMAT_VERSION = 2
WEIGHTS_NAME = "routers.safetensors"
BUILTIN_DIR = Path(__file__).parent / "builtin"


@dataclass(frozen=True)
class BuiltinRouters:
    base_model: str  # the builtin model name (skipgpt.models.BUILTIN_MODELS) they were tuned on
    description: str


BUILTIN_ROUTERS: dict[str, BuiltinRouters] = {
    "smollm2-135m-rt25": BuiltinRouters("smollm2-135m", "SmolLM2-135M-Instruct, 25 % of the routable parameters skipped"),
    "smollm2-135m-rt40": BuiltinRouters("smollm2-135m", "SmolLM2-135M-Instruct, 40 % of the routable parameters skipped"),
}


def router_dir(name_or_path: str | os.PathLike) -> Path:
    """The directory of a router set given by path or builtin name (a path wins if it exists)."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in BUILTIN_ROUTERS:
        return BUILTIN_DIR / str(name_or_path)
    return path


def routers_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = routing_state(model)
    return {
        f"layers.{i}.{name}": p.detach().cpu().contiguous()
        for i, layer in enumerate(state.adapter.decoder_layers(model))
        for name, p in layer.skip_routers.state_dict().items()
    }


def load_routers_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = routing_state(model)
    for i, layer in enumerate(state.adapter.decoder_layers(model)):
        prefix = f"layers.{i}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            layer.skip_routers.load_state_dict(own, strict=True)
        except RuntimeError as err:
            raise SkipGPTError(f"router weights do not fit this model's layer {i}: {err}") from None


def save_routers(model: nn.Module, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """``router_config.json`` + ``routers.safetensors``: small, and loadable onto the base model."""
    state = routing_state(model)
    out = Path(out_dir)
    write_json(out / CONFIG_NAME, {"format": "skipgpt-routers", "version": FORMAT_VERSION, "router": state.config.to_dict(), **(extra or {})})
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(routers_state_dict(model), tmp, metadata={"format": "pt"}))
    return out


def read_router_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    path = router_dir(name_or_path) / CONFIG_NAME
    if not path.is_file():
        if exported_settings(router_dir(name_or_path)) is not None:
            raise SkipGPTError(f"{name_or_path} is an exported model with its routers in its weights: load it as the "
                               f"model (--model {name_or_path}, skipgpt.models.load_model) and give no router set")
        raise SkipGPTError(f"no {CONFIG_NAME} in {name_or_path}: pass the output directory of 'skipgpt tune' "
                           f"or a builtin router set ({', '.join(BUILTIN_ROUTERS)})")
    try:
        data = json.loads(path.read_text())
        if data.get("version", 1) < 2:
            data["router"] = {"replacement": "none", "replacement_rank": 0, **data["router"]}
        RouterConfig.from_dict(data["router"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise SkipGPTError(f"{path} is corrupt ({err}); re-run 'skipgpt tune' or restore the file") from None
    return data


def read_router_weights(name_or_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    weights = router_dir(name_or_path) / WEIGHTS_NAME
    try:
        return load_file(str(weights))
    except FileNotFoundError:
        raise SkipGPTError(f"no {WEIGHTS_NAME} in {name_or_path}") from None
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise SkipGPTError(f"{weights} is corrupt ({err}); re-run 'skipgpt tune' or restore the file") from None


def _check_fingerprint(model: nn.Module, config: RouterConfig, name: str | os.PathLike, strict: bool) -> None:
    """Same shape, other weights (a fine-tune, a sibling checkpoint): the routers run but were not
    trained for these hidden states. Sets saved before fingerprints were recorded are not checked."""
    ours = weights_fingerprint(model) if config.base_fingerprint else None
    if ours is None or ours == config.base_fingerprint:
        return
    message = (f"the routers in {name} were tuned on {config.base_model!r} (weights fingerprint {config.base_fingerprint}), "
               f"but this model's weights differ (fingerprint {ours}): a fine-tune or another checkpoint of the same "
               "shape, for whose hidden states the routers were not trained")
    if strict:
        raise SkipGPTError(f"{message}; load them onto the model they were tuned on, or drop --strict")
    warnings.warn(f"{message} (a float16 model can also round differently; --strict refuses)", stacklevel=3)


def load_routers(model: nn.Module, name_or_path: str | os.PathLike, *, strict: bool = False) -> nn.Module:
    """Attach routers saved by :func:`save_routers` (a directory or a builtin name) onto ``model``,
    refusing a base model of another shape, and warning (``strict``: refusing) where the weights
    are not those the routers were tuned on."""
    data = read_router_config(name_or_path)
    directory = router_dir(name_or_path)
    config = RouterConfig.from_dict(data["router"])
    builtin = BUILTIN_ROUTERS.get(str(name_or_path)) if directory.parent == BUILTIN_DIR else None
    if builtin is not None and getattr(model, "skipgpt_builtin", None) != builtin.base_model:
        raise SkipGPTError(
            f"the builtin router set {name_or_path} was tuned on the builtin model {builtin.base_model!r} and fits "
            f"only that model; load it with --model {builtin.base_model} (skipgpt.models.load_model({builtin.base_model!r}))"
        )
    text_config = model.config.get_text_config()
    expected = (config.model_type, config.hidden_size, config.num_layers)
    actual = (model.config.model_type, text_config.hidden_size, len(get_adapter(model).decoder_layers(model)))
    if expected != actual:
        raise SkipGPTError(
            f"routers in {name_or_path} were trained for a {expected[0]} model with hidden size {expected[1]} "
            f"and {expected[2]} layers (base {config.base_model!r}), but this model is a {actual[0]} with "
            f"hidden size {actual[1]} and {actual[2]} layers; load them onto the model they were trained on"
        )
    _check_fingerprint(model, config, name_or_path, strict)
    tensors = read_router_weights(name_or_path)
    attach_routers(model, config)
    try:
        load_routers_state_dict(model, tensors)
    except SkipGPTError:
        detach_routers(model)
        raise
    return model
