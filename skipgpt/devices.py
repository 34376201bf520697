"""Where a module computes and in which dtype a model runs, for models on one device or spread
over several by accelerate's big-model loading (``device_map``), offloaded parts included.

A parameter's ``.device`` is not enough: accelerate leaves offloaded weights on the ``meta``
device and moves them in for each forward, so the device a layer *computes* on is its hook's
``execution_device``. Everything skipgpt adds to a layer (routers, statistics, masks) belongs
there.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SkipGPTError

DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The CLI's --dtype choices; "auto" is resolved by :func:`resolve_dtype`.
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)


def module_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device where it has one
    (offloaded weights sit on ``meta`` between forwards), else that of its first real tensor."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the device of the input embeddings (with a ``device_map``, the first
    layers' device; accelerate moves the hidden states on from there)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(embeddings if embeddings is not None else model)


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate spread the model over devices or offloaded part of it (``device_map``)."""
    return bool(getattr(model, "hf_device_map", None))


def checkpoint_dtype(config: object) -> torch.dtype | None:
    """The dtype a checkpoint was saved in (``config.dtype``, ``torch_dtype`` before transformers 5)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPE_NAMES.get(dtype.removeprefix("torch."))
    return dtype if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values() else None


def resolve_dtype(name: str | torch.dtype, device: str | torch.device | None, config: object | None = None) -> torch.dtype:
    """``auto``: the checkpoint's own dtype on an accelerator, float32 on a CPU.

    On a CPU, bf16/fp16 matmuls are fast only where the processor has the instructions (AVX-512
    BF16, AMX) and half-precision reductions lose accuracy without saving time elsewhere, so
    float32 is the safe default there; on a GPU the checkpoint's dtype (bf16 for most current
    LLMs) halves memory and runs at full speed. ``device`` None means a device map, i.e. GPUs
    when there are any.
    """
    if isinstance(name, torch.dtype):
        return name
    if name != "auto":
        try:
            return DTYPE_NAMES[name]
        except KeyError:
            raise SkipGPTError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}") from None
    if runs_on_cpu(device):
        return torch.float32
    return (checkpoint_dtype(config) if config is not None else None) or torch.float32


def runs_on_cpu(device: str | torch.device | None) -> bool:
    """Whether a model placed on ``device`` computes on a CPU (None: a device map, which uses
    the GPUs when there are any)."""
    return torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``--max-memory 0=70GiB,1=70GiB,cpu=200GiB`` as accelerate's ``max_memory`` dict."""
    if not text:
        return None
    limits: dict[int | str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise SkipGPTError(f"--max-memory takes DEVICE=SIZE pairs separated by commas (e.g. 0=70GiB,cpu=200GiB), got {item!r}")
        limits[int(key) if key.isdigit() else key] = value
    return limits
