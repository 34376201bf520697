"""Loading a saved LoRA adapter (from ``skipgpt finetune``) onto a base model, routed or not.

Evaluation, generation, export and the command line all load adapters; training writes them. The
loading lives here, below both, so that nothing that only runs a model imports the training code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from .errors import SkipGPTError
from .routing.save_load import CONFIG_NAME, read_router_config, read_router_weights, routers_state_dict
from .routing.surgery import has_routers

ADAPTER_CONFIG = "adapter_config.json"


def check_adapter_dir(adapter_dir: str | Path) -> None:
    if not (Path(adapter_dir) / ADAPTER_CONFIG).is_file():
        raise SkipGPTError(f"no {ADAPTER_CONFIG} in {adapter_dir}: pass the output directory of 'skipgpt finetune'")


def _check_replacements(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """An adapter fine-tuned with ``train_replacements`` was trained with the replacements saved
    beside it: with any others (the stage-1 set it started from) it is a different model."""
    if not (Path(adapter_dir) / CONFIG_NAME).is_file():
        return
    if not read_router_config(adapter_dir).get("training", {}).get("train_replacements"):
        return
    theirs = {k: v for k, v in read_router_weights(adapter_dir).items() if ".replacement." in k}
    ours = routers_state_dict(model) if has_routers(model) else {}
    if any(k not in ours or not torch.equal(ours[k], v) for k, v in theirs.items()):
        raise SkipGPTError(f"the adapter in {adapter_dir} was fine-tuned together with its replacements: "
                           f"load the routers saved beside it (--routers {adapter_dir})")


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> PeftModel:
    """Put a saved LoRA adapter onto ``model`` (which carries its routers already, if any)."""
    check_adapter_dir(adapter_dir)
    _check_replacements(model, adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        raise SkipGPTError(
            f"the adapter in {adapter_dir} does not fit this model ({str(err).splitlines()[0]}); "
            "load it onto the base model it was trained on"
        ) from None
