"""A routed model as a Hugging Face model class, so that the rest of the ecosystem loads it routed.

An exported directory (``skipgpt export``) holds the base weights and, in the same safetensors
files, the router weights under the names they have in the routed model
(``model.layers.3.skip_routers.mlp.net.weight``). Its ``config.json`` carries the router
configuration under :data:`CONFIG_KEY` and an ``auto_map`` naming a tiny ``modeling_skipgpt.py``
that builds the routed class from this module. So

* ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (lm-evaluation-harness's
  ``hf`` model type, a serving script, a notebook) gets the routed, skipping model;
* ``from_pretrained(dir)`` without it gets the plain dense model (transformers reports the router
  weights as unexpected keys), which the export's model card says in its first line;
* ``save_pretrained`` / ``push_to_hub`` of the loaded model writes the same layout back (the
  modeling file travels with it, as for any remote-code model).

The routed class is the base class (``LlamaForCausalLM``, ...) with routers attached in
``__init__``, so transformers' own loading (meta-device init, dtype, ``device_map``) places and
fills them like any other weight; routers are kept in float32 under any load dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from ..config import RouterConfig
from ..errors import SkipGPTError
from .surgery import attach_routers

CONFIG_KEY = "skipgpt"  # config.json entry: {"router": RouterConfig, "base_architecture": "LlamaForCausalLM"}
MODELING_FILE = "modeling_skipgpt.py"
CLASS_PREFIX = "SkipGPT"
ROUTER_MODULES = "skip_routers"

_MODELING_SOURCE = '''"""SkipGPT routed model: {base} with a router before every attention and MLP module.

Loaded with ``trust_remote_code=True`` this builds the routed, skipping model from the installed
``skipgpt`` package (nothing of it is copied here); without it, transformers loads the dense model.
"""

try:
    from skipgpt.routing.hub import routed_model_class
except ImportError as err:
    raise ImportError(
        "This directory is a SkipGPT routed model: loading it routed needs the skipgpt package "
        "(pip install skipgpt). Loaded without trust_remote_code=True it is the DENSE model, "
        "with the routers ignored."
    ) from err

{name} = routed_model_class("{base}", __name__)
'''


def routed_class_name(base: str) -> str:
    return f"{CLASS_PREFIX}{base}"


def routed_model_class(base: str, module: str | None = None) -> type:
    """The routed subclass of transformers' ``base`` class (e.g. ``"LlamaForCausalLM"``).

    ``module`` is the module the class is to belong to: transformers' ``save_pretrained`` copies
    that module's file beside the weights, which must be the small modeling file, not this one.
    """
    try:
        base_class = getattr(transformers, base)
    except AttributeError:
        raise SkipGPTError(f"this transformers ({transformers.__version__}) has no model class {base!r}; "
                           "the routed model needs the transformers version its base model needs") from None

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        base_class.__init__(self, config, *args, **kwargs)
        settings = getattr(config, CONFIG_KEY, None)
        if not isinstance(settings, dict) or "router" not in settings:
            raise SkipGPTError(f"config.json has no '{CONFIG_KEY}' router entry: this directory was not written by "
                               "'skipgpt export'; load it with its own model class")
        attach_routers(self, RouterConfig.from_dict(settings["router"]))

    return type(routed_class_name(base), (base_class,), {
        "__init__": __init__,
        "__module__": module or __name__,
        "__doc__": f"{base} with SkipGPT routers (skipgpt.routing.hub).",
        # Routers decide in float32 whatever the model's dtype (a bf16 margin is too coarse for a threshold).
        "_keep_in_fp32_modules": [ROUTER_MODULES],
        "_keep_in_fp32_modules_strict": [ROUTER_MODULES],
    })


def routed_settings(model: nn.Module, router: RouterConfig) -> dict[str, Any]:
    """The ``config.json`` entry that makes ``model`` (with routers attached) load routed."""
    base = type(model).__name__
    if base.startswith(CLASS_PREFIX):
        base = base[len(CLASS_PREFIX):]
    return {"router": router.to_dict(), "base_architecture": base}


def mark_routed(config: Any, settings: dict[str, Any]) -> None:
    """Point ``config`` (saved with the weights) at the routed class of :func:`write_modeling_file`."""
    setattr(config, CONFIG_KEY, settings)
    name = routed_class_name(settings["base_architecture"])
    config.architectures = [name]
    config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{name}"}


def write_modeling_file(out_dir: Path, settings: dict[str, Any]) -> Path:
    base = settings["base_architecture"]
    path = out_dir / MODELING_FILE
    path.write_text(_MODELING_SOURCE.format(base=base, name=routed_class_name(base)))
    return path


def exported_settings(directory: str | Path) -> dict[str, Any] | None:
    """The routing entry of an exported model directory's ``config.json`` (None: not routed)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text()).get(CONFIG_KEY)
    except (ValueError, AttributeError) as err:
        raise SkipGPTError(f"{path} is corrupt ({err}); restore it or export the model again") from None
    return settings if isinstance(settings, dict) else None
