"""One self-contained directory for a routed (and LoRA-recovered) model.

The directory is a normal Hugging Face model directory (LoRA merged into the weights), so anyone
can load it with plain transformers and get the dense model; beside the weights lie the router
files, which ``skipgpt.models.load_model`` attaches automatically, and ``skipgpt_export.json``
recording what was done.
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
from ..routing.save_load import load_routers, save_routers
from ..routing.surgery import detach_routers, has_routers, routing_state

EXPORT_NAME = "skipgpt_export.json"


def export_model(model_name: str, out_dir: str | Path, *, routers: str | None = None, adapter: str | None = None,
                 dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> Path:
    """Write base + routers (+ merged adapter) to ``out_dir``, atomically.

    ``dtype="auto"`` keeps the checkpoint's own dtype on every device: an export is a copy of the
    model, and a bf16 7B model written as float32 would be 28 GB instead of 14. The LoRA merge runs
    on ``device``.
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
        if has_routers(model):
            # The exported weights (LoRA merged) are what the routers now load onto.
            routing_state(model).config.base_fingerprint = weights_fingerprint(model) or ""
            save_routers(model, staging, extra={"export": info})
            detach_routers(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / EXPORT_NAME, info)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
