"""Dataclass configs: what a router set *is* (saved with it) and how stage 1 trains it.

Both are plain dataclasses so they round-trip through JSON unchanged: a router directory
records the exact recipe that produced it, which is what makes results reproducible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from .errors import SkipGPTError

RouterKind = Literal["linear", "mlp"]
Config = TypeVar("Config", bound="JsonConfig")
TargetUnit = Literal["params", "modules"]


class JsonConfig:
    """JSON round trip for dataclass configs; unknown keys from newer versions are ignored."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[Config], data: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RouterConfig(JsonConfig):
    """Architecture of the routers and how their logits become decisions.

    ``init_bias`` +3 (start from the dense model) beat a random start and a static-cut seed on
    SmolLM2 (docs/small-budget.md). ``input_norm``: the raw residual stream's scale varies by
    orders of magnitude across layers, so a parameter-free RMS normalisation lets one learning
    rate suit every router (docs/method-choices.md, "Routers"; not re-ablated here).
    """

    router: RouterKind = "linear"
    input_norm: bool = True
    # "execute": every router starts at +init_bias (the dense model). "importance": routers of
    # the least important modules (Block Influence on calibration text) start at -init_bias, so
    # argmax routing starts as the best static module cut at the target ratio.
    init: Literal["execute", "importance"] = "execute"
    init_bias: float = 3.0
    # Inference decision: execute iff logit_execute - logit_skip > threshold. Argmax is 0;
    # calibration moves it so that argmax routing delivers the ratio that was asked for.
    threshold: float = 0.0
    # What a token that skips attention leaves behind: "keep" (the paper) still writes its keys
    # and values, so later tokens see it; "drop" writes none at that layer (a smaller KV cache).
    # Inference must use the policy the routers were trained with, so it is part of this config.
    kv_policy: Literal["keep", "drop"] = "keep"
    # How router scores become decisions. "skipgpt": each module's own gate (argmax / Gumbel).
    # The dynamic baselines: "mod-d", top-k tokens of each sequence per module with ``capacity``
    # the share that executes (Mixture-of-Depths, attention and MLP decoupled); "d-llm", one
    # decision per token per layer for attention and MLP together, every token executing
    # exactly round(capacity × layers) layers (D-LLM's per-token budget).
    routing: Literal["skipgpt", "mod-d", "d-llm"] = "skipgpt"
    capacity: float = 1.0
    # What a skipping token gets instead of the module's output: "none" (the paper: nothing),
    # "bias" (a learned per-module vector) or "lowrank" (that vector plus a rank-
    # ``replacement_rank`` map of the hidden state). Its cost is counted against the savings.
    # Rank 16 (0.7 % of an MLP's parameters on SmolLM2) cut WikiText-2 perplexity at 25 % from
    # 74.5 to 47.4 at equal tokens; rank 64 did no better (docs/small-budget.md).
    replacement: Literal["none", "bias", "lowrank"] = "lowrank"
    replacement_rank: int = 16
    # Filled in by attach_routers: the shape refuses another base model; the name, revision and
    # weights fingerprint (skipgpt/identity.py) tell a fine-tune or a same-shape sibling apart.
    model_type: str = ""
    hidden_size: int = 0
    num_layers: int = 0
    base_model: str = ""
    base_revision: str = ""
    base_fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.router not in ("linear", "mlp"):
            raise SkipGPTError(f"router must be 'linear' or 'mlp', got {self.router!r}")
        if self.init not in ("execute", "importance"):
            raise SkipGPTError(f"router init must be 'execute' or 'importance', got {self.init!r}")
        if self.kv_policy not in ("keep", "drop"):
            raise SkipGPTError(f"kv_policy must be 'keep' or 'drop', got {self.kv_policy!r}")
        if self.routing not in ("skipgpt", "mod-d", "d-llm"):
            raise SkipGPTError(f"routing must be 'skipgpt', 'mod-d' or 'd-llm', got {self.routing!r}")
        if not 0.0 < self.capacity <= 1.0:
            raise SkipGPTError(f"capacity (share of tokens or layers executed) must be in (0, 1], got {self.capacity}")
        if self.replacement not in ("none", "bias", "lowrank"):
            raise SkipGPTError(f"replacement must be 'none', 'bias' or 'lowrank', got {self.replacement!r}")
        if self.replacement != "lowrank":
            self.replacement_rank = 0  # the rank belongs to the low-rank map alone
        elif self.replacement_rank < 1:
            raise SkipGPTError(f"replacement 'lowrank' needs a replacement rank >= 1, got {self.replacement_rank}")


def check_target(target: float) -> float:
    """Sparsity targets live in [0, 1): skipping everything is not a model any more."""
    if not 0.0 <= target < 1.0:
        raise SkipGPTError(
            f"target sparsity must be in [0, 1), got {target}; e.g. --target 0.25 skips a quarter"
        )
    return target


@dataclass
class TuneConfig(JsonConfig):
    """Stage-1 router tuning. Defaults follow the paper except the budget, which is CPU-sized,
    and the loss (see ``loss``)."""

    target: float = 0.25
    target_unit: TargetUnit = "params"
    alpha: float = 8.0
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.95)
    # Decoupled (AdamW) decay of the routers' weight matrices only: their biases carry the execute
    # prior and the replacements are fitted outputs, so pulling either to zero would be wrong. Once
    # the routing settles, the noisy straight-through gradient walks router weights away at about
    # the learning rate per step, and nothing pulls them back (docs/small-budget.md); the decay does.
    # 1.0 by measurement: 750 bf16 steps at 2e-3 scored 39.3 with it and 66.1 without (24 WikiText-2
    # windows), and 111 steps scored the same either way (45.5 at 25.1 %, 45.7 at 25.3 %).
    weight_decay: float = 1.0
    tau_start: float = 5.0
    tau_end: float = 1.0
    # Scale of the Gumbel noise, annealed linearly like τ. 1 throughout is the paper's sampler,
    # whose hard samples skip far more than argmax routing does on the same routers; ending at 0
    # trains, in the last steps, exactly the decisions that inference deploys.
    noise_start: float = 1.0
    noise_end: float = 1.0
    # Fraction of the run spent at noise_start before the noise anneals: 0.8 with noise_end 0
    # keeps the paper's sampler for 80 % of the steps and trains the argmax decisions only at the end.
    noise_from: float = 0.0
    # "cosine" decays the learning rate to min_lr_ratio × lr over the run; "constant" is the paper's.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    # Fraction of the run at the full rate before the cosine starts: with noise_from equal to it, the
    # deterministic last phase settles at a falling rate instead of oscillating at the full one.
    lr_decay_from: float = 0.0
    # Which decisions the sparsity term counts: the sampled ones the forward takes (the paper), or
    # "argmax": those argmax inference takes on the batch (one extra no-grad forward, gradient
    # through sigmoid(margin / τ)), so that the deployed ratio is trained rather than calibrated.
    # It lands near the target but the samples then skip more than it, and quality suffers
    # (docs/small-budget.md, `argsp`): calibration after training is the default.
    sparsity_of: Literal["sampled", "argmax"] = "sampled"
    # Weight of the hidden-state distillation term (KL loss only): the mean over layers of the
    # routed residual stream's squared error to the dense one, relative to the dense one's power.
    hidden_distill: float = 0.0
    # Training sequences on which replacements (RouterConfig.replacement) are fitted to the dense
    # modules before tuning starts. None: enough of seq_len for max(8192, 4 × hidden size) tokens,
    # counted in tokens (skipgpt.training.replacements.fit_sequence_count): a d-dimensional regression
    # on fewer tokens than d is mostly its ridge term.
    fit_sequences: int | None = None
    # KL to the frozen dense model beat the paper's next-token NLL by 4x in perplexity at the same
    # CPU budget (docs/small-budget.md), so it is the default; "nll" is the paper's recipe.
    loss: Literal["nll", "kl"] = "kl"
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 50
    calibrate: bool = True
    calib_sequences: int = 4
    calib_seq_len: int = 1024
    calib_sample: str = "tail"  # or "spread": whole documents from across the training text (skipgpt.data)
    # Wall-clock budget in minutes for tuning plus calibration on this machine: when set, a short
    # timing probe sizes ``steps`` before training (the τ schedule needs the count up front).
    budget_minutes: float | None = None

    def __post_init__(self) -> None:
        check_target(self.target)
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise SkipGPTError(f"budget_minutes must be positive, got {self.budget_minutes}")
        if self.target_unit not in ("params", "modules"):
            raise SkipGPTError(f"target unit must be 'params' or 'modules', got {self.target_unit!r}")
        if self.loss not in ("nll", "kl"):
            raise SkipGPTError(f"loss must be 'nll' or 'kl', got {self.loss!r}")
        if self.sparsity_of not in ("sampled", "argmax"):
            raise SkipGPTError(f"sparsity_of must be 'sampled' or 'argmax', got {self.sparsity_of!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise SkipGPTError(f"lr schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.hidden_distill and self.loss != "kl":
            raise SkipGPTError("hidden-state distillation needs the dense model as teacher: use it with --loss kl")
        for name in ("noise_from", "lr_decay_from"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SkipGPTError(f"{name} is a fraction of the run in [0, 1), got {getattr(self, name)}")
        if self.lr_decay_from and self.lr_schedule != "cosine":
            raise SkipGPTError("lr_decay_from delays the cosine decay: use it with lr_schedule 'cosine' (--lr-schedule cosine)")
        for name in ("noise_start", "noise_end", "hidden_distill", "weight_decay"):
            if getattr(self, name) < 0:
                raise SkipGPTError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "fit_sequences"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SkipGPTError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.betas = tuple(self.betas)  # JSON gives a list back
