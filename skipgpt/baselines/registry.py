"""Every baseline by its command-line name, with what it needs and how it is rebuilt.

A plain table: each method module registers itself when imported, and the package's
``__init__`` imports them all, so the registry imports no method (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..errors import SkipGPTError
from .structure import PrunePlan, remove_modules


def _remove_planned(model: nn.Module, plan: PrunePlan) -> None:
    remove_modules(model, plan.removed)


@dataclass(frozen=True)
class StaticMethod:
    """A one-shot pruning method: ``prune(model, calib_ids [N, T], ratio)`` edits the model in
    place and returns its plan; ``restructure(model, plan)`` turns a fresh base model into the
    pruned architecture (weights the method changed are then loaded from the saved file)."""

    name: str
    description: str
    prune: Callable[[nn.Module, torch.Tensor, float], PrunePlan]
    restructure: Callable[[nn.Module, PrunePlan], None] = _remove_planned
    granularity: Literal["layer", "module", "width"] = "layer"
    label: str = ""  # as tables name it (the paper's spelling)


@dataclass(frozen=True)
class DynamicMethod:
    """A trained token router (MoD-D, D-LLM): trained by ``skipgpt compare`` with the same
    data and step budget as SkipGPT-RT."""

    name: str
    description: str
    label: str = ""
    # Tuning options that differ from the TuneConfig every dynamic method gets (e.g. the paper's loss).
    tune_overrides: tuple[tuple[str, Any], ...] = ()


STATIC: dict[str, StaticMethod] = {}
DYNAMIC: dict[str, DynamicMethod] = {}


def register(method: StaticMethod | DynamicMethod) -> None:
    (STATIC if isinstance(method, StaticMethod) else DYNAMIC)[method.name] = method


def get_method(name: str) -> StaticMethod:
    try:
        return STATIC[name]
    except KeyError:
        raise SkipGPTError(f"unknown pruning method {name!r}; static methods: {', '.join(sorted(STATIC))}") from None


def method_names() -> list[str]:
    return [*STATIC, *DYNAMIC]


def method_label(name: str) -> str:
    method = STATIC.get(name) or DYNAMIC.get(name)
    return (method.label if method is not None else "") or name
