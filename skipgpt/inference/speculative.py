"""Lossless self-speculative decoding: the routed model drafts, the same weights run dense to verify.

Argmax routing makes the routed model a cheap draft that shares every weight with the dense
model, so drafting needs no second model, only a second KV cache. Each round the draft proposes
k tokens one at a time; one dense forward (gate mode ``dense`` on the same model object) over the
last committed token and the k drafts scores all k + 1 positions at once, and

* greedy: the longest prefix on which the dense argmax agrees is accepted, plus the dense
  model's own next token, so the output is the dense model's greedy output token for token;
* sampling: a draft token x is accepted with probability min(1, p(x)/q(x)); at the first
  rejection the token is drawn from norm(max(0, p − q)); if all k pass, a bonus token is drawn
  from p (Leviathan et al. 2023; Chen et al. 2023), so tokens follow the dense distribution.

Both caches are rolled back to the committed tokens after every round: the dense one (a
``DynamicCache`` whose sliding-window layers record their past so that they can be cropped) and
the draft's (its own ``DynamicCache`` under KV policy ``keep``, since upstream skips change its
keys and values; :class:`~skipgpt.routing.kv.DroppedKVCache`, cropped by position, under ``drop``).
The draft lags one or two committed tokens behind and catches up when it next drafts.

Batches: rows accept different numbers of drafts. Every round commits, for all rows, the smallest
number any unfinished row accepted plus one token; a row that accepted more commits its accepted
draft there, which is its own verified token (greedy: the dense argmax; sampling: the token its
accept/reject step emitted), so nothing is lost, only re-drafted. Rows stay aligned, so positions
and masks are exactly those of ``model.generate``, and finished rows (EOS) continue with
``pad_token_id`` as there.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import SkipGPTError
from ..routing.surgery import gate_mode, has_routers, routing_state
from ..routing.kv import DroppedKVCache

AUTO = "auto"
# --draft-tokens auto: start at AUTO_START; after a round whose drafts were all accepted draft one
# more (up to AUTO_MAX), after one that accepted fewer than half draft one fewer (down to 1).
AUTO_START, AUTO_MAX = 4, 8

# Generation-config settings under which model.generate would pick other tokens than the plain
# processing below (value: the setting that changes nothing). Refused rather than silently ignored.
_NEUTRAL_SETTINGS: dict[str, Any] = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "min_length": 0,
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "min_p": None, "typical_p": 1.0,
}


def parse_draft_tokens(value: int | str) -> int | str:
    """Tokens drafted per round: a positive integer (also written as a string) or ``"auto"``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise SkipGPTError(f"draft tokens must be a positive integer or '{AUTO}', got {value!r}")


@dataclass
class Sampling:
    """How logits become the distribution tokens are drawn from: the same for the draft's q and
    the dense p, and the same warpers in the same order as ``model.generate(do_sample=True)``."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    warpers: LogitsProcessorList = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise SkipGPTError(f"sampling needs a temperature > 0, got {self.temperature}; greedy decoding is do_sample=False")
        warpers = []
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> float32 probabilities."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return torch.softmax(self.warpers(None, flat), dim=-1).view(logits.shape)


@dataclass
class SpeculativeStats:
    """What the rounds of one call achieved. Counts are over the rows still generating."""

    rounds: int = 0
    drafted: int = 0  # draft tokens put to the dense model
    accepted: int = 0  # of those, accepted (each row's own longest accepted prefix)
    committed_drafts: int = 0  # accepted drafts committed (the batch rule's minimum), summed over rounds
    draft_lengths: list[int] = field(default_factory=list)  # k of each round ("auto" changes it)
    # Sampling: rows whose committed token at draft position j was drawn from the residual
    # max(0, p − q) (their first rejection was there), and rows that drew a bonus token from p.
    residual_at: list[int] = field(default_factory=list)
    bonus: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per dense forward: committed drafts plus the dense model's own token."""
        return (self.committed_drafts + self.rounds) / self.rounds if self.rounds else 0.0

    def summary(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
                "draft_lengths": list(self.draft_lengths), "residual_at": list(self.residual_at), "bonus": self.bonus}


def _accept(p_draft: torch.Tensor, q_draft: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Accept each draft token with probability min(1, p(x)/q(x))."""
    u = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)
    return u * q_draft < p_draft


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejection samples from, norm(max(0, p − q)); p itself where rounding leaves nothing."""
    rest = (p - q).clamp(min=0)
    total = rest.sum(-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp(min=torch.finfo(rest.dtype).tiny), p)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _leading(accepted: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading entries are True."""
    return accepted.long().cumprod(1).sum(1)


def _croppable_cache(model: nn.Module) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()  # sliding-window layers keep what a rollback may need
    return cache


def _check_generation_config(model: nn.Module) -> None:
    config = getattr(model, "generation_config", None)
    for name, neutral in _NEUTRAL_SETTINGS.items():
        value = getattr(config, name, None)
        if value not in (None, neutral, []):
            raise SkipGPTError(
                f"this model's generation config sets {name}={value!r}, which model.generate applies and speculative "
                f"decoding does not; set model.generation_config.{name} = None to decode speculatively"
            )


class SpeculativeDecoder:
    """One batch being decoded: its committed tokens and the draft's and the dense caches.

    ``prefill`` then ``step`` until ``done`` (what :meth:`run` does), under ``torch.no_grad()``
    and argmax routing.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, draft_tokens: int | str = AUTO_START, sampling: Sampling | None = None,
                 generator: torch.Generator | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None):
        if not has_routers(model):
            raise SkipGPTError("speculative decoding drafts with the routed model and verifies with the same weights "
                               "dense: load routers first (--routers DIR, or skipgpt.load_routers)")
        if max_new_tokens < 1:
            raise SkipGPTError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        _check_generation_config(model)
        draft_tokens = parse_draft_tokens(draft_tokens)
        self.auto = draft_tokens == AUTO
        self.k = AUTO_START if self.auto else int(draft_tokens)
        self.model, self.state = model, routing_state(model)
        self.sampling, self.generator = sampling, generator
        device = input_ids.device
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = None if eos_token_id is None else torch.tensor(eos_token_id, dtype=torch.long, device=device).flatten()
        # generate's default where no pad token is given: the (first) EOS token
        self.pad = pad_token_id if pad_token_id is not None else int(self.eos[0]) if self.eos is not None and self.eos.numel() else 0
        self.tokens, self.prompt_len, self.max_new = input_ids, input_ids.shape[1], max_new_tokens
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
        full = torch.cat([mask, mask.new_ones(mask.shape[0], max_new_tokens)], dim=1)
        # As model.generate: positions count real tokens (padding at 0), and no mask without padding.
        self.positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)
        self.mask = None if bool(mask.all()) else full
        self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "past_key_values" if "past_key_values" in params else "cache"
        self.dense_cache = _croppable_cache(model)
        self.draft_cache = DroppedKVCache() if self.state.config.kv_policy == "drop" else _croppable_cache(model)
        self.stats = SpeculativeStats()

    @property
    def generated(self) -> int:
        return self.tokens.shape[1] - self.prompt_len

    @property
    def done(self) -> bool:
        return self.generated >= self.max_new or bool(self.finished.all())

    def run(self) -> torch.Tensor:
        """Prompt and new tokens [B, prompt + new], as ``model.generate`` returns them."""
        with torch.no_grad(), gate_mode(self.model, "argmax"):
            self.prefill()
            while not self.done:
                self.step()
        return self.tokens

    def prefill(self) -> None:
        """Both caches take the prompt; the first new token is the dense model's."""
        logits = self._forward(self.tokens, self.dense_cache, dense=True)[:, -1]
        self._forward(self.tokens, self.draft_cache, dense=False)
        first = _sample(self.sampling.probs(logits), self.generator) if self.sampling else logits.argmax(-1)
        self._commit(first[:, None])

    def step(self) -> None:
        """One round: draft k, verify them in one dense forward, commit, roll both caches back."""
        k = min(self.k, self.max_new - self.generated - 1)  # never draft past max_new_tokens
        drafts, q = self._draft(k)
        start = self.dense_cache.get_seq_length()
        ids = torch.cat([self.tokens[:, start:], drafts], dim=1)
        logits = self._forward(ids, self.dense_cache, dense=True, keep=k + 1)[:, -(k + 1):]
        live = ~self.finished
        if self.sampling is None:
            targets = logits.argmax(-1)
            accepted = _leading(drafts == targets[:, :k])
            n = int(accepted[live].min())
            block = targets[:, : n + 1]  # equal to the accepted drafts, then the dense model's token
        else:
            p = self.sampling.probs(logits)
            take = lambda probs: probs.gather(-1, drafts[..., None]).squeeze(-1)  # noqa: E731
            accepted = _leading(_accept(take(p[:, :k]), take(q), self.generator)) if k else torch.zeros_like(live, dtype=torch.long)
            n = int(accepted[live].min())
            if n == k:  # every live row accepted everything: a bonus token from p
                last = _sample(p[:, k], self.generator)
                self.stats.bonus += int(live.sum())
            else:
                last = torch.where(accepted > n, drafts[:, n], _sample(_residual(p[:, n], q[:, n]), self.generator))
                self.stats.residual_at += [0] * (n + 1 - len(self.stats.residual_at))
                self.stats.residual_at[n] += int((live & (accepted == n)).sum())
            block = torch.cat([drafts[:, :n], last[:, None]], dim=1)
        self._commit(block)
        self._roll_back()
        self.stats.rounds += 1
        self.stats.drafted += k * int(live.sum())
        self.stats.accepted += int(accepted[live].sum())
        self.stats.committed_drafts += n
        self.stats.draft_lengths.append(k)
        if self.auto and k == self.k:
            self.k = min(k + 1, AUTO_MAX) if n == k else max(k - 1, 1) if n < k / 2 else k

    def _draft(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k draft tokens [B, k] and, when sampling, their distributions q [B, k, V]. The last
        draft is not fed back: if it is accepted the draft catches up next round."""
        ids = self.tokens[:, self.draft_cache.get_seq_length():]
        drafts, probs = [], []
        for _ in range(k):
            logits = self._forward(ids, self.draft_cache, dense=False)[:, -1]
            if self.sampling is None:
                ids = logits.argmax(-1, keepdim=True)
            else:
                probs.append(self.sampling.probs(logits))
                ids = _sample(probs[-1], self.generator)[:, None]
            drafts.append(ids)
        return (torch.cat(drafts, dim=1) if drafts else self.tokens[:, :0]), (torch.stack(probs, dim=1) if probs else None)

    def _forward(self, ids: torch.Tensor, cache: DynamicCache, dense: bool, keep: int = 1) -> torch.Tensor:
        """Logits of the last ``keep`` positions of ``ids``, fed after what ``cache`` holds."""
        start = cache.get_seq_length()
        end = start + ids.shape[1]
        kwargs: dict[str, Any] = {"input_ids": ids, "position_ids": self.positions[:, start:end], "use_cache": True,
                                  "logits_to_keep": keep, self.cache_kw: cache}
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask[:, :end]
        if not dense:
            return self.model(**kwargs).logits
        meter, self.state.meter = self.state.meter, None  # measured sparsity is the draft's
        try:
            with gate_mode(self.model, "dense"):
                return self.model(**kwargs).logits
        finally:
            self.state.meter = meter

    def _commit(self, block: torch.Tensor) -> None:
        """Append [B, m] new tokens as ``model.generate`` would: up to max_new_tokens, padding
        after a row's EOS, and stopping once every row has finished."""
        block = block[:, : self.max_new - self.generated]
        if self.eos is not None:
            ended = (torch.isin(block, self.eos).cumsum(1) > 0) | self.finished[:, None]  # finished after each token
            block = block.masked_fill(torch.cat([self.finished[:, None], ended[:, :-1]], dim=1), self.pad)
            all_ended = ended.all(0).nonzero()
            if all_ended.numel():
                block = block[:, : int(all_ended[0]) + 1]
            self.finished = ended[:, block.shape[1] - 1]
        self.tokens = torch.cat([self.tokens, block], dim=1)

    def _roll_back(self) -> None:
        """Both caches keep only committed tokens (all but the last, which the next round feeds).
        Crop also runs when nothing is removed: it trims sliding-window layers back to the window."""
        keep = self.tokens.shape[1] - 1
        for cache in (self.dense_cache, self.draft_cache):
            cache.crop(min(keep - cache.get_seq_length(), 0))


def speculative_decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       max_new_tokens: int, draft_tokens: int | str = AUTO_START, sampling: Sampling | None = None,
                       seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
                       pad_token_id: int | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """``model.generate(input_ids, attention_mask, max_new_tokens=..., do_sample=sampling is not None)``
    of the dense model, computed by drafting with the routed one: identical tokens for greedy
    decoding, the same distribution for sampling (a seeded generator of its own)."""
    generator = torch.Generator(input_ids.device).manual_seed(seed) if sampling is not None else None
    decoder = SpeculativeDecoder(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                 draft_tokens=draft_tokens, sampling=sampling, generator=generator,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return decoder.run(), decoder.stats
