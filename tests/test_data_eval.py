"""Text sources, their tokenisation into sequences, and the perplexity protocol."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CharTokenizer, WordIdTokenizer, shared_data_dir, tiny_model

from skipgpt import RouterConfig, SkipGPTError, attach_routers, routing_state, set_gate_mode
from skipgpt.data import DATA_DIR_ENV, bos_token, load_source, pack_documents, pydoc_documents, training_sequences
from skipgpt.evaluation.perplexity import perplexity


@pytest.fixture
def no_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# ---- load_source ------------------------------------------------------------------------------


def _file(name: str, content: str):
    def make(tmp_path):
        (tmp_path / name).write_text(content)
        return str(tmp_path / name), "test", None

    return make


SOURCE_ERRORS = {
    "missing file": (lambda tmp: (str(tmp / "nope.txt"), "test", None), "neither a named set"),
    "empty txt": (_file("empty.txt", ""), "contains no text"),
    "whitespace-only txt": (_file("blank.txt", "\n   \n\t\n"), "contains no text"),
    "empty jsonl": (_file("empty.jsonl", "\n\n"), "contains no text"),
    "jsonl without text field": (_file("bad.jsonl", '{"text": "ok"}\n{"body": "x"}\n'), r"bad.jsonl:2 .*'text' field"),
    "jsonl that is not json": (_file("bad.jsonl", "not json\n"), r"bad.jsonl:1 is not a JSON object"),
    "named set without data dir": (lambda tmp: ("wikitext2", "test", None), f"--data-dir DIR or set {DATA_DIR_ENV}"),
    "named set, file absent": (lambda tmp: ("ptb", "test", str(tmp)), "does not exist"),
    "named set, unknown split": (lambda tmp: ("wikitext2", "train", str(tmp)), "has no 'train' split"),
}


@pytest.mark.parametrize("case", list(SOURCE_ERRORS))
def test_bad_data_raises_skipgpt_error(case, tmp_path, no_data_dir):
    make, message = SOURCE_ERRORS[case]
    spec, split, data_dir = make(tmp_path)
    with pytest.raises(SkipGPTError, match=message):
        load_source(spec, split, data_dir)


def test_txt_file_loads_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\n")
    source = load_source(str(tmp_path / "a.txt"))
    assert source.documents == ["first line\n", "", "", "second line\n"]
    assert source.text() == "first line\n" + "\n\n" * 3 + "second line\n"  # rows joined with a blank line


def test_jsonl_file_loads_text_fields(tmp_path):
    rows = [{"text": "alpha beta", "url": "x"}, {"text": "gamma"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    source = load_source(str(tmp_path / "a.jsonl"), "train")
    assert source.documents == ["alpha beta", "gamma"]
    assert source.text() == "alpha beta\n\ngamma"


def test_named_set_reads_from_env_data_dir(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.valid.txt").write_text(" a b \n c d \n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_source("ptb", "valid").joiner == " "


def test_pydoc_works_offline_and_splits_are_disjoint(no_data_dir):
    train, test = load_source("pydoc", "train"), load_source("pydoc", "test")
    everything = pydoc_documents()
    assert len(train.documents) + len(test.documents) == len(everything)
    assert len(test.documents) == len(everything) // 10  # every 10th topic held out
    assert not set(train.documents) & set(test.documents)
    assert load_source("pydoc", "valid").documents == test.documents
    assert len(test.text()) > 10_000


# ---- sequences --------------------------------------------------------------------------------

# 1000 unique tokens t0..t999 in 10 documents of 100.
DOCS = [" ".join(f"t{i}" for i in range(k * 100, (k + 1) * 100)) for k in range(10)]


def test_calibration_tokens_are_held_out_from_training():
    train, calib = training_sequences(WordIdTokenizer(), DOCS, seq_len=16, calib_sequences=2, calib_seq_len=32)
    assert train.shape == ((1000 - 64) // 16, 16) and calib.shape == (2, 32)
    assert calib.flatten().tolist() == list(range(936, 1000))  # the corpus tail
    assert train.flatten().tolist() == list(range(train.numel()))  # the head, in order
    assert not set(train.flatten().tolist()) & set(calib.flatten().tolist())


class BosWordIdTokenizer(WordIdTokenizer):
    """Words ``t<k>`` as id k, and BOS first where special tokens are asked for: the convention of
    Gemma's and Llama 3's tokenizers."""

    def __init__(self, bos: int = 5000):
        self.bos_token_id = bos

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = True) -> dict:
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": [self.bos_token_id] * add_special_tokens + ids}


def test_training_and_calibration_sequences_start_with_bos_where_the_tokenizer_adds_it():
    assert bos_token(BosWordIdTokenizer()) == 5000 and bos_token(WordIdTokenizer()) is None
    train, calib = training_sequences(BosWordIdTokenizer(), DOCS, seq_len=16, calib_sequences=2, calib_seq_len=32)
    assert calib.shape == (2, 32) and train.shape == ((1000 - 62) // 15, 16)
    assert (train[:, 0] == 5000).all() and (calib[:, 0] == 5000).all()
    assert calib[:, 1:].flatten().tolist() == list(range(938, 1000))  # the corpus tail, BOS before each sequence
    assert train[:, 1:].flatten().tolist() == list(range(train.shape[0] * 15))  # no text token lost to BOS


def test_perplexity_windows_start_with_bos_where_the_tokenizer_adds_it():
    model = tiny_model("llama")
    text = " ".join(f"t{i % 120 + 3}" for i in range(100))
    plain = perplexity(model, WordIdTokenizer(), text, seq_len=16, progress=False)
    with_bos = perplexity(model, BosWordIdTokenizer(bos=127), text, seq_len=16, progress=False)
    assert plain["bos"] is False and with_bos["bos"] is True
    assert plain["windows"] == 100 // 16 and with_bos["windows"] == 100 // 15
    assert with_bos["scored_tokens"] == plain["scored_tokens"] == 6 * 15  # BOS + 15 text tokens a window, all 15 scored
    ids = torch.tensor(WordIdTokenizer()(text)["input_ids"])[: 6 * 15].view(6, 15)
    windows = torch.cat([torch.full((6, 1), 127), ids], dim=1)
    assert with_bos["nll"] == pytest.approx(hand_nll(model, windows), rel=1e-5)


def test_no_calibration_set_when_the_corpus_is_too_small():
    train, calib = training_sequences(WordIdTokenizer(), DOCS, seq_len=16, calib_sequences=2, calib_seq_len=490)
    assert calib is None
    assert train.shape == (1000 // 16, 16)


def test_pack_documents_joins_with_eos_and_drops_the_tail():
    tokenizer = CharTokenizer()
    packed = pack_documents(tokenizer, ["abc", "   ", "de"], seq_len=2)
    eos = tokenizer.eos_token_id
    assert packed.tolist() == [[97, 98], [99, eos], [100, 101]]  # blank document skipped, last eos dropped


def test_too_little_text_for_one_sequence_raises():
    with pytest.raises(SkipGPTError, match="fewer than one sequence of 64"):
        pack_documents(CharTokenizer(), ["short"], seq_len=64)
    with pytest.raises(SkipGPTError, match="fewer than one sequence"):
        training_sequences(CharTokenizer(), ["short"], 64, 0, 0)


# ---- perplexity -------------------------------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog. " * 8  # 360 characters


@torch.no_grad()
def hand_nll(model, windows: torch.Tensor) -> float:
    logits = model(input_ids=windows).logits[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


@pytest.mark.parametrize("seq_len,batch_size,max_windows,windows", [(32, 1, None, 11), (32, 4, None, 11), (40, 3, 5, 5)])
def test_perplexity_by_hand(seq_len, batch_size, max_windows, windows):
    model = tiny_model("llama")
    r = perplexity(model, CharTokenizer(), TEXT, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows, progress=False)
    ids = torch.tensor(CharTokenizer()(TEXT)["input_ids"])[: windows * seq_len].view(windows, seq_len)
    assert r["windows"] == windows
    assert r["scored_tokens"] == windows * (seq_len - 1)
    assert r["nll"] == pytest.approx(hand_nll(model, ids), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(r["nll"]), rel=1e-12)
    assert r["routed"] is False and r["sparsity"] is None


def test_routed_perplexity_equals_dense_when_every_gate_executes():
    model = tiny_model("llama")
    dense = perplexity(model, CharTokenizer(), TEXT, seq_len=32, progress=False)
    attach_routers(model, RouterConfig(threshold=-1e9))
    routed = perplexity(model, CharTokenizer(), TEXT, seq_len=32, progress=False)
    assert routed["ppl"] == dense["ppl"]
    assert routed["routed"] is True
    # nothing skipped: the ratio is what the routers themselves cost (tests/test_sparsity.py)
    assert routed["sparsity"]["module_sparsity"] == 0.0
    assert routed["sparsity"]["param_ratio"] == pytest.approx(-routing_state(model).router_share)
    assert routed["sparsity"]["tokens"] == 11 * 32
    assert len(routed["sparsity"]["per_layer"]) == 3


def test_routed_perplexity_uses_argmax_routing_and_reports_sparsity():
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0))
    set_gate_mode(model, "gumbel")
    r = perplexity(model, CharTokenizer(), TEXT, seq_len=32, batch_size=4, progress=False)
    assert routing_state(model).mode == "gumbel"  # restored afterwards
    set_gate_mode(model, "argmax")
    ids = torch.tensor(CharTokenizer()(TEXT)["input_ids"])[: 11 * 32].view(11, 32)
    assert r["nll"] == pytest.approx(hand_nll(model, ids), rel=1e-5)  # deterministic, like argmax
    skipped = 1 - routing_state(model).stacked_gates()
    assert r["sparsity"]["module_sparsity"] == pytest.approx(float(skipped.mean()))
    assert 0 < r["sparsity"]["module_sparsity"] < 1


def test_text_shorter_than_a_window_raises():
    with pytest.raises(SkipGPTError, match="fewer than one window of 1024"):
        perplexity(tiny_model("llama"), CharTokenizer(), "too short", seq_len=1024, progress=False)


# ---- the shared evaluation sets -----------------------------------------------------------------

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="no shared data directory ($SKIPGPT_DATA_DIR or ../shared/data)")


@needs_data
def test_wikitext2_test_matches_the_hf_raw_rows():
    source = load_source("wikitext2", "test", DATA)
    rows = source.documents
    assert source.joiner == "\n\n"
    assert len(rows) == 4358  # rows of HF wikitext-2-raw-v1 test
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert not any("\r" in row for row in rows)  # the shared copy has CRLF line endings
    # HF dataset_info num_bytes of the test split: UTF-8 bytes of every row + 4 (Arrow offsets).
    assert sum(len(row.encode()) + 4 for row in rows) == 1_305_088
    assert source.text().startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English")


@needs_data
def test_ptb_test_text_follows_the_gptq_protocol():
    """GPTQ evaluates ``" ".join(ptb_text_only["test"]["sentence"])``; that HF loader strips
    every line, so the text has no newlines and single spaces between sentences."""
    source = load_source("ptb", "test", DATA)
    lines = (DATA / "ptb" / "ptb.test.txt").read_text().splitlines()
    assert source.joiner == " " and len(source.documents) == len(lines) == 3761
    assert source.text() == " ".join(line.strip() for line in lines)


@needs_data
def test_c4_sample_is_the_default_training_text():
    source = load_source("c4", "train", DATA)
    assert len(source.documents) == 1000 and all(isinstance(d, str) and d for d in source.documents)


def test_spread_calibration_holds_out_whole_documents_from_across_the_corpus():
    train, calib = training_sequences(WordIdTokenizer(), DOCS, seq_len=16, calib_sequences=2, calib_seq_len=64, calib_sample="spread")
    assert calib.shape == (2, 64)
    # Documents 5 and 2 (the middle, then the first quarter: van der Corput order), in corpus order, cut to 128 tokens.
    assert calib.flatten().tolist() == list(range(200, 300)) + list(range(500, 528))
    assert not set(range(200, 300)) & set(train.flatten().tolist()) and not set(range(500, 600)) & set(train.flatten().tolist())
    assert train.shape == ((1000 - 200) // 16, 16)  # the two held documents leave the training stream whole
    with pytest.raises(SkipGPTError, match="calib_sample must be one of"):
        training_sequences(WordIdTokenizer(), DOCS, 16, 2, 64, calib_sample="middle")
