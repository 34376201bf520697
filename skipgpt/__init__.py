"""skipgpt: per-token dynamic module skipping (SkipGPT) for Hugging Face decoder LLMs."""

from .adapters import ADAPTERS, ArchAdapter, get_adapter
from .config import RouterConfig, TuneConfig
from .engine import DroppedKVCache
from .errors import SkipGPTError
from .generate import GenerateConfig, Generation, generate
from .speculative import speculative_decode
from .surgery import (
    attach_routers,
    detach_routers,
    gate_mode,
    has_routers,
    load_routers,
    measure_sparsity,
    router_parameters,
    routing_state,
    save_routers,
    set_gate_mode,
)

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "ArchAdapter",
    "DroppedKVCache",
    "GenerateConfig",
    "Generation",
    "RouterConfig",
    "SkipGPTError",
    "TuneConfig",
    "attach_routers",
    "detach_routers",
    "gate_mode",
    "generate",
    "get_adapter",
    "has_routers",
    "load_routers",
    "measure_sparsity",
    "router_parameters",
    "routing_state",
    "save_routers",
    "set_gate_mode",
    "speculative_decode",
]
