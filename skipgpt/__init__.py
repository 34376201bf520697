"""skipgpt: per-token dynamic module skipping (SkipGPT) for Hugging Face decoder LLMs."""

from .config import RouterConfig, TuneConfig
from .errors import SkipGPTError
from .inference.generate import GenerateConfig, Generation, generate
from .routing.kv import DroppedKVCache
from .inference.speculative import speculative_decode
from .routing.adapters import ADAPTERS, ArchAdapter, get_adapter
from .routing.save_load import load_routers, save_routers
from .routing.surgery import (
    attach_routers,
    detach_routers,
    gate_mode,
    has_routers,
    measure_sparsity,
    router_parameters,
    routing_state,
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
