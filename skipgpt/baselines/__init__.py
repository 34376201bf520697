"""The paper's baselines behind one interface: static pruning methods that physically remove
structure (depth.py, slicegpt.py, llm_pruner.py) and trained dynamic routers (dynamic.py),
compared by one protocol (compare.py).

Importing the method modules here registers them (registry.py), so any use of the package
sees every method.
"""

from . import depth, dynamic, llm_pruner, slicegpt  # noqa: F401  (each registers its methods)
from .registry import get_method, method_names
from .save_load import PLAN_NAME, load_pruned, read_plan, save_pruned
from .structure import PrunePlan, remove_modules

__all__ = ["PLAN_NAME", "PrunePlan", "get_method", "load_pruned", "method_names", "read_plan", "remove_modules", "save_pruned"]
