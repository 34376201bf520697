"""One self-contained directory for a routed (and LoRA-recovered) model.

The directory is a Hugging Face model directory (LoRA merged into the weights) whose safetensors
files also hold the router weights under their names in the routed model, and whose
``config.json`` points ``AutoModelForCausalLM`` at a small ``modeling_skipgpt.py``
(:mod:`skipgpt.routing.hub`). So ``from_pretrained(dir, trust_remote_code=True)`` — lm-eval's
``hf`` model, a serving script — loads the routed, skipping model; ``skipgpt.models.load_model``
loads it routed without remote code; plain ``from_pretrained(dir)`` loads the dense model, which
the model card says in its first line. ``skipgpt_export.json`` records what was done.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..files import write_json
from ..identity import weights_fingerprint
from ..lora import load_adapter
from ..models import load_model, saved_dtype
from ..routing.hub import MODELING_FILE, mark_routed, routed_settings, write_modeling_file
from ..routing.save_load import load_routers
from ..routing.surgery import has_routers, routing_state

EXPORT_NAME = "skipgpt_export.json"
CARD_NAME = "README.md"


def export_model(model_name: str, out_dir: str | Path, *, routers: str | None = None, adapter: str | None = None,
                 dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> Path:
    """Write base + routers (+ merged adapter) to ``out_dir``, atomically.

    ``dtype="auto"`` keeps the checkpoint's own dtype on every device: an export is a copy of the
    model, and a bf16 7B model written as float32 would be 28 GB instead of 14. The LoRA merge runs
    on ``device``. Routers stay float32 in any dtype.
    """
    out = Path(out_dir)
    dtype = saved_dtype(model_name) if dtype == "auto" else dtype
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    if routers:
        load_routers(model, routers)
    if adapter:
        model = load_adapter(model, adapter).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        info: dict[str, Any] = {"base_model": model_name, "routers": routers, "adapter": adapter, "lora_merged": bool(adapter),
                                "dtype": str(model.dtype).removeprefix("torch.")}
        settings = None
        if has_routers(model):
            config = routing_state(model).config
            # The exported weights (LoRA merged) are what the routers now load onto.
            config.base_fingerprint = weights_fingerprint(model) or ""
            settings = routed_settings(model, config)
            mark_routed(model.config, settings)
            write_modeling_file(staging, settings)
        model.save_pretrained(staging)  # with routers attached, their weights are in the same files
        tokenizer.save_pretrained(staging)
        write_json(staging / EXPORT_NAME, info)
        if settings is not None:
            (staging / CARD_NAME).write_text(model_card(out.name, info, settings))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def model_card(name: str, info: dict[str, Any], settings: dict[str, Any]) -> str:
    """The first line is the one thing a reader must not miss: plain loading is the dense model."""
    router = settings["router"]
    return f"""**Load with `trust_remote_code=True` (and `pip install skipgpt`): without it, transformers loads the DENSE model and ignores the routers.**

# {name}: SkipGPT routed {settings["base_architecture"]}

A router before every attention and MLP module decides, per token, whether the module runs
(SkipGPT, Zhao et al., ICML 2025). Base model: `{info["base_model"]}`; router set: `{info["routers"]}`;
LoRA merged: {info["lora_merged"]}; router threshold {router["threshold"]}; replacement
`{router["replacement"]}` (rank {router["replacement_rank"]}).

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)  # routed, skipping
```

lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={name},trust_remote_code=True ...`

`{MODELING_FILE}` builds the routed class from the installed `skipgpt` package; the router weights
are in the same safetensors files as the base weights (`model.layers.N.skip_routers.*`), and the
router configuration is `config.json`'s `skipgpt` entry. `save_pretrained` of the loaded model
writes this layout back. Loaded with skipgpt: `skipgpt.models.load_model("{name}")` or
`skipgpt eval --model {name}`.
"""
