"""Which way the skipping engine computes a routed module: gathered, dense-then-select, or not at all.

Skipping saves time only where it saves what the device is short of. Gathering the executing
tokens (``routing/execute.py``) saves their FLOPs but costs an index gather and a scatter into a
zero update; when the module is bound by reading its weights (a decode step on a CPU or a GPU,
where a batch of 8 tokens costs what 1 costs), a gathered MLP for 6 of 8 tokens reads the same
weights as the dense one and only adds the gather. So for each module and forward the engine picks:

* **skip**: no token executes (only the replacement runs);
* **model**: every token executes (the model's own code, nothing added);
* **gather** or **dense** otherwise: run the module on the executing tokens only, or on every
  token and keep the executing tokens' outputs (skipping tokens get their replacement). Both give
  the masked computation's result; they differ in cost only.

The choice between the last two is :class:`PathCosts`: for each module kind and token count N (a
grid of powers of two) the largest executing fraction at which gathering measured faster than
the dense path on this device, dtype, width and thread count. It is measured once, on the
model's first routed layer (about 5 s on a 2-core CPU for SmolLM2, a fraction of that on a GPU),
and cached in ``$SKIPGPT_CACHE/engine_costs.json``; a missing or corrupt cache measures again,
and a layer that cannot be timed here (offloaded to ``meta``) gathers whenever anything skips
(:data:`DEFAULT_PATH`). Delete the file, or call :func:`measure_path_costs` with ``force=True``,
to measure again (after a driver, library or hardware change).

The attention's gatherable part is timed as its query and output projections: the attention core
(which only gathering saves, and which grows with the context) is left out, so the choice leans
toward the dense path — it may leave a little prefill speed unused but does not make a batch slower.
"""

from __future__ import annotations

import json
import time
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from ..files import cache_dir, write_json
from .adapters import ArchAdapter

Path_ = Literal["gather", "dense"]
ENGINE_PATHS = ("auto", "gather", "dense")  # RoutingState.engine_path: measured choice, or forced
DEFAULT_PATH: Path_ = "gather"  # where nothing could be measured: what the engine did before it had a choice
CACHE_NAME = "engine_costs.json"
FORMAT_VERSION = 1
GRID = tuple(2**i for i in range(12))  # token counts 1 .. 2048
FRACTIONS = (0.25, 0.5, 0.75)
REPEATS = 3
_MEASURED: dict[str, "PathCosts"] = {}  # this process's measurements and cache reads, by cost_key


@dataclass
class PathCosts:
    """``crossover[kind]``: for each grid token count N (ascending), the largest executing
    fraction at which gathering was faster than the dense path (0: never)."""

    key: str
    crossover: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def choose(self, kind: str, executing: int, tokens: int) -> Path_:
        """Deterministic for a given measurement: the grid point at or below ``tokens``."""
        points = self.crossover.get(kind)
        if not points:
            return DEFAULT_PATH
        limit = points[0][1]
        for n, fraction in points:
            if n > tokens:
                break
            limit = fraction
        return "gather" if executing <= limit * tokens else "dense"


def cost_key(layer: nn.Module, adapter: ArchAdapter, device: torch.device) -> str:
    """What the measurement depends on: device (by name), dtype, module widths, threads."""
    _, mlp, _ = adapter.branch(layer, "mlp")
    _, attn, _ = adapter.branch(layer, "attn")
    weight = next(mlp.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    shapes = [tuple(p.shape) for p in (*mlp.parameters(), attn.q_proj.weight, attn.o_proj.weight)]
    return json.dumps([FORMAT_VERSION, name, str(weight.dtype), shapes, torch.get_num_threads(), torch.__version__])


def _read_cache() -> dict:
    try:
        data = json.loads((cache_dir() / CACHE_NAME).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing, unreadable or corrupt: measure again
        return {}


def _from_entry(key: str, entry: object) -> PathCosts | None:
    try:
        crossover = {kind: [(int(n), float(f)) for n, f in points] for kind, points in entry.items()}  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return None
    return PathCosts(key, crossover)


def _last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20)
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=64 * 2**20)


class _Flush:
    """Evicts the caches before each timed run. In a forward the weights stream from memory, one
    layer after another; timed alone and repeated, one layer's weights (10 MB for SmolLM2's MLP)
    stay in a 32 MB L3, and a weight-bound module looks compute-bound: that measurement said
    gathering paid at 8 tokens, where in the model it does not."""

    def __init__(self, device: torch.device):
        self.buffer = torch.empty(2 * _last_level_cache_bytes(device) // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.fill_(1.0)


def _timed(run: Callable[[], object], device: torch.device, flush: Callable[[], None] = lambda: None) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _paths_of(compute: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, n: int) -> tuple[Callable, Callable]:
    """The two ways to compute a module for the first ``n`` of ``hidden``'s tokens, as the engine does."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    tokens = flat.shape[0]
    index = torch.randperm(tokens, device=hidden.device)[:n].sort().values
    keep = torch.zeros(tokens, 1, dtype=torch.bool, device=hidden.device)
    keep[index] = True

    def gather() -> torch.Tensor:
        out = compute(flat.index_select(0, index))
        return torch.zeros_like(flat).index_copy_(0, index, out)

    def dense() -> torch.Tensor:
        return torch.where(keep, compute(flat), 0)

    return gather, dense


@torch.no_grad()
def measure_path_costs(layer: nn.Module, adapter: ArchAdapter, device: torch.device, *, force: bool = False,
                       max_tokens: int = GRID[-1]) -> PathCosts:
    """The cached measurement for this layer's shapes on ``device``, measuring it if needed."""
    key = cost_key(layer, adapter, device)
    if not force and key in _MEASURED:
        return _MEASURED[key]
    cached = None if force else _from_entry(key, _read_cache().get(key))
    if cached is not None:
        _MEASURED[key] = cached
        return cached
    print(f"skipgpt: timing the skipping engine's two paths on {device} once (cached in {cache_dir() / CACHE_NAME})",
          file=sys.stderr)
    _, mlp, _ = adapter.branch(layer, "mlp")
    _, attn, _ = adapter.branch(layer, "attn")
    weight = next(mlp.parameters())
    hidden_size = weight.shape[1] if weight.dim() == 2 else weight.shape[-1]
    kinds: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "mlp": mlp,
        "attn": lambda x: attn.o_proj(attn.q_proj(x)),
    }
    flush = _Flush(device)
    crossover: dict[str, list[tuple[int, float]]] = {}
    for kind, compute in kinds.items():
        points = []
        for tokens in (n for n in GRID if n <= max_tokens):
            hidden = torch.randn(tokens, hidden_size, device=device, dtype=weight.dtype)
            best = 0.0
            for fraction in FRACTIONS:
                n = int(fraction * tokens)
                if not 0 < n < tokens:
                    continue
                gather, dense = _paths_of(compute, hidden, n)
                gather(), dense()  # warm-up
                if _timed(gather, device, flush) < _timed(dense, device, flush):
                    best = fraction
            points.append((tokens, best))
        crossover[kind] = points
    costs = _MEASURED[key] = PathCosts(key, crossover)
    cache = _read_cache()  # read again just before writing: another process may have added its own entry
    cache[key] = costs.crossover
    try:
        write_json(cache_dir() / CACHE_NAME, cache)
    except OSError:  # a read-only cache still gives this process its measurement
        pass
    return costs
