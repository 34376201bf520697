"""Which base model a router set or a pruning plan belongs to: its name, revision and a
fingerprint of its weights, recorded when they are made and checked when they are loaded.

Shape checks (model type, hidden size, layer count) cannot tell a model from its fine-tune, nor
one Llama from another of the same size; a router set loaded onto the wrong one runs, and its
numbers look right. The fingerprint hashes a few fixed slices of the weights rounded to bfloat16,
so the same checkpoint loaded in float32 or bfloat16, on any device, gives the same one (float16
rounds first at other points and may not: a mismatch is then a warning to read, not proof).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

PROBE_VALUES = 4096  # values hashed from each probed tensor


def base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's own weights, without what skipgpt or PEFT added."""
    return [(n, p) for n, p in model.named_parameters() if "skip_routers" not in n and "lora_" not in n]


def weights_fingerprint(model: nn.Module) -> str | None:
    """A hash of the first values of the first, middle and last base weight tensor, in bfloat16;
    None where one of them is offloaded (on ``meta``) and cannot be read here."""
    params = base_parameters(model)
    if not params:
        return None
    digest = hashlib.sha256()
    for _, p in (params[0], params[len(params) // 2], params[-1]):
        if p.device.type == "meta":
            return None
        values = p.detach().flatten()[:PROBE_VALUES].to("cpu", torch.float32).to(torch.bfloat16)
        digest.update(values.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def source_name(model: nn.Module) -> str:
    """The name the model was loaded by (``skipgpt.models.load_model`` records it: a builtin name,
    the exact ``.gguf`` file, a directory or a hub id), else what transformers recorded."""
    return str(getattr(model, "skipgpt_source", "") or getattr(model.config, "_name_or_path", ""))


def revision(model: nn.Module) -> str:
    """The hub commit the weights came from, where transformers knows it."""
    return str(getattr(model.config, "_commit_hash", "") or "")


def code_revision(repo: Path = Path(__file__).resolve().parents[1]) -> str:
    """The commit of the checkout this package runs from, read from .git (no git process), so a
    result names the code that made it; "unknown" for an installed package outside a checkout."""
    try:
        git = repo / ".git"
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        refs = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git  # a worktree's branches
        ref = head.removeprefix("ref: ")
        if ref == head or (refs / ref).is_file():
            return (head if ref == head else (refs / ref).read_text().strip())[:7]
        return next(line.split()[0][:7] for line in (refs / "packed-refs").read_text().splitlines() if line.endswith(" " + ref))
    except (OSError, StopIteration, IndexError):
        return "unknown"
