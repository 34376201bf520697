"""The paper's baselines behind one interface: static pruning methods that physically remove
structure (depth.py, width.py) and trained dynamic routers (dynamic.py), compared by one
protocol (compare.py)."""

from .registry import get_method, method_names
from .structure import PrunePlan, load_pruned, read_plan, remove_modules, save_pruned

__all__ = ["PrunePlan", "get_method", "load_pruned", "method_names", "read_plan", "remove_modules", "save_pruned"]
