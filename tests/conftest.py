"""Tiny randomly initialised models of every supported architecture, built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread pool's
# spin-waiting makes every op many times slower than running it on one thread.
torch.set_num_threads(1)

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"]


def tiny_model(model_type: str = "llama", seed: int = 0, attn: str = "eager", **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"sliding_window": 16} if model_type in ("gemma2", "gemma3_text", "mistral") else {}
    config = AutoConfig.for_model(model_type, **{**TINY, **extra, **overrides})
    config._name_or_path = f"tiny-{model_type}"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where the device-aware tests run: the GPU when there is one (benchmarks/gpu_check.sh runs
    them there), else the CPU. A test that takes this fixture must pass on both."""
    return DEVICE


# ---------------------------------------------------------------------------------------------
# Helpers shared by the test modules (import them with ``from conftest import ...``).

REPO = Path(__file__).resolve().parents[1]


def random_ids(n: int, seq_len: int, seed: int = 0, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    """Random token ids [n, seq_len] from their own generator (the global RNG is left alone)."""
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


class CharTokenizer:
    """The smallest tokenizer the package needs: one id per character, folded into the tiny vocab."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = True) -> dict:
        assert add_special_tokens is False, "skipgpt must never ask for special tokens"
        return {"input_ids": [ord(c) % TINY["vocab_size"] for c in text]}


class WordIdTokenizer:
    """Words ``t<k>`` become id k: every token of a test corpus is unique, so which tokens went
    where (training, calibration) can be checked by set operations."""

    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = True) -> dict:
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def shared_data_dir() -> Path | None:
    """The project's shared data directory ($SKIPGPT_DATA_DIR, else ../shared/data), if present."""
    value = os.environ.get("SKIPGPT_DATA_DIR")
    path = Path(value) if value else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every base-model parameter (everything that is not a router)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if "skip_routers" not in k}


def router_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "skip_routers" in k}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"tensors differ: {changed[:5]}"


WORDS = [f"w{i}" for i in range(TINY["vocab_size"] - 2)]


def save_tiny_model_dir(path: Path, model_type: str = "llama", **overrides) -> Path:
    """A tiny model with a word-level tokenizer, saved as a normal HF directory, so the CLI
    (which loads models by path) runs end to end with no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(path)
    tiny_model(model_type, **overrides).save_pretrained(path)
    return path


def write_word_text(path: Path, words: int, seed: int = 0, lines_of: int = 40) -> Path:
    """Text over the tiny tokenizer's vocabulary, one document per line."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in ids[k : k + lines_of]) for k in range(0, words, lines_of)]
    path.write_text("\n".join(lines) + "\n")
    return path


def accelerate_launch(args: list[str], cwd: Path, timeout: int = 180):
    """Two data-parallel CPU processes. `--cpu` alone starts a single process; two CPU processes
    are torchrun's job, which accelerate runs for --multi_gpu, and ACCELERATE_USE_CPU makes each
    join a gloo process group (without it, on a machine with no GPU, each believes it is alone)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def forbid_model_loading(monkeypatch, refuse) -> None:
    """Make every command's model loading call ``refuse``: bad input must fail before it."""
    import skipgpt.cli
    from skipgpt.cli import common

    for module in (common, *skipgpt.cli.GROUPS):
        if hasattr(module, "load_model"):
            monkeypatch.setattr(module, "load_model", refuse)


def left_padded(batch: int = 3, length: int = 24, seed: int = 1, pad: int = 5):
    """Token ids [batch, length] and a mask whose rows after the first are left-padded by pad, 2·pad, ... tokens."""
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : pad * row] = 0
    return ids, mask


def logits_both_ways(model, ids, mask):
    """Logits of the skipping engine and of the masked computation it must equal."""
    from skipgpt import routing_state

    state = routing_state(model)
    out = {}
    for skip in (True, False):
        state.skip_compute = skip
        with torch.no_grad():
            out[skip] = model(input_ids=ids, attention_mask=mask).logits
    state.skip_compute = True
    return out[True], out[False]


class Interrupt(KeyboardInterrupt):
    """A Ctrl-C that tests raise themselves."""


def interrupt_tune_after(monkeypatch, calls: int, function: str = "routed_loss") -> None:
    """Make the (calls+1)-th call of ``function`` in router tuning raise :class:`Interrupt`, as a
    Ctrl-C in the middle of a run would (checkpoints written so far are kept). ``routed_loss`` runs
    once per micro-batch, the budget probe's included; ``tau_at`` twice per training micro-batch only."""
    import skipgpt.training.tune

    real, count = getattr(skipgpt.training.tune, function), [0]

    def flaky(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(skipgpt.training.tune, function, flaky)
