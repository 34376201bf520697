"""Bad input that docs/reliability.md lists and no other test file covers, and the check that
every row of that table names a test that exists."""

from __future__ import annotations

import re

import huggingface_hub.constants
import pytest
from conftest import REPO, WORDS, save_tiny_model_dir, tiny_model, write_word_text
from transformers import AutoConfig, AutoModelForCausalLM

from skipgpt import RouterConfig, SkipGPTError, attach_routers, save_routers
from skipgpt.cli import main
from skipgpt.models import load_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    save_tiny_model_dir(root / "model")
    write_word_text(root / "train.txt", 8000)
    return root


def error_of(argv: list[str], capsys) -> str:
    """The CLI's error line (after any progress bars) for ``argv``, which must exit with 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("skipgpt: error: ")
    return last


# ---- models -----------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


OFFLINE = ("is not a local path, not a builtin model (smollm2-135m), and the Hugging Face Hub is unreachable (offline, "
           "or HF_HUB_OFFLINE is set) and there is no copy of it in the local Hugging Face cache. Pass a local Hugging "
           "Face model directory or a .gguf file instead.")


def test_an_offline_hub_id_without_a_cached_copy_is_refused(offline_hub):
    with pytest.raises(SkipGPTError) as err:
        load_model("someone/no-such-model")
    assert str(err.value) == f"'someone/no-such-model' {OFFLINE}"


def test_an_unknown_builtin_name_lists_the_builtins(offline_hub):
    with pytest.raises(SkipGPTError) as err:
        load_model("smollm2-1.7b")
    assert str(err.value) == f"'smollm2-1.7b' {OFFLINE}"


def test_a_missing_model_path_is_refused(tmp_path):
    with pytest.raises(SkipGPTError, match=re.escape(f"No such file or directory: {tmp_path / 'nope'}. Pass an existing "
                                                     ".gguf file or Hugging Face model directory, or a builtin model (smollm2-135m).")):
        load_model(str(tmp_path / "nope"))


def test_a_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(SkipGPTError, match="is a directory without config.json, so it is not a Hugging Face model directory"):
        load_model(str(tmp_path))


def test_an_unsupported_architecture_fails_tune_and_leaves_no_output(workspace, tmp_path, capsys):
    config = AutoConfig.for_model("gpt2", vocab_size=len(WORDS) + 2, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "gpt2").joinpath("tokenizer.json").write_bytes((workspace / "model" / "tokenizer.json").read_bytes())
    (tmp_path / "gpt2").joinpath("tokenizer_config.json").write_bytes((workspace / "model" / "tokenizer_config.json").read_bytes())
    err = error_of(["tune", "--model", str(tmp_path / "gpt2"), "--data", str(workspace / "train.txt"),
                    "--out", str(tmp_path / "out")], capsys)
    assert "architecture 'gpt2' is not supported; supported model types: " in err
    assert not (tmp_path / "out").exists()


# ---- generation -------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_refused(workspace, capsys):
    prompt = " ".join(WORDS[:50] * 6)  # 300 tokens; the tiny model's context is 256
    err = error_of(["generate", "--model", str(workspace / "model"), "--prompt", prompt, "--max-new-tokens", "4"], capsys)
    assert ("the longest prompt has 300 tokens; with 4 new tokens that exceeds the model's context of 256 tokens: "
            "shorten the prompt or lower --max-new-tokens") in err


def test_empty_or_missing_prompts_are_refused(workspace, capsys):
    model = ["generate", "--model", str(workspace / "model")]
    assert "give at least one non-empty prompt" in error_of([*model, "--prompt", ""], capsys)
    assert "give --prompt TEXT (repeatable) or --prompt-file FILE" in error_of(model, capsys)


# ---- conflicting options ----------------------------------------------------------------------


def test_conflicting_options_are_refused(workspace, tmp_path, capsys):
    model, data = ["--model", str(workspace / "model")], ["--data", str(workspace / "train.txt")]
    routers = tmp_path / "routers"
    save_routers(attach_routers(tiny_model("llama"), RouterConfig()), routers)
    assert ("SkipGPT-RT-L needs --routers DIR; --joint trains fresh routers and --dense has none, so they take no "
            "--routers") in error_of(["finetune", *model, *data, "--joint", "--routers", str(routers), "--out", str(tmp_path / "o")], capsys)
    assert "--pruned and --routers are separate methods; give one of them" in error_of(
        ["eval", *model, *data, "--routers", str(routers), "--pruned", str(tmp_path), "--seq-len", "32"], capsys)
    assert "hidden-state distillation needs the dense model as teacher: use it with --loss kl" in error_of(
        ["tune", *model, *data, "--loss", "nll", "--hidden-distill", "0.5", "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_routers_for_a_model_that_carries_its_own_are_refused(workspace, tmp_path, capsys):
    exported = save_tiny_model_dir(tmp_path / "exported")  # what 'skipgpt export' writes: the model and its routers
    save_routers(attach_routers(tiny_model("llama"), RouterConfig()), exported)
    err = error_of(["eval", "--model", str(exported), "--routers", str(exported), "--data", str(workspace / "train.txt"),
                    "--seq-len", "32"], capsys)
    assert f"{exported} carries its own routers (an exported model); omit --routers" in err


def test_compare_refuses_unknown_methods_and_ratios(workspace, tmp_path, capsys):
    args = ["compare", "--model", str(workspace / "model"), "--data", str(workspace / "train.txt"),
            "--eval", str(workspace / "train.txt"), "--out", str(tmp_path / "o")]
    assert "unknown methods ['nope']; choose from: all, " in error_of([*args, "--methods", "nope"], capsys)
    assert "--ratio takes ratios in (0, 1), comma-separated; got '0.25,1.5'" in error_of([*args, "--ratio", "0.25,1.5"], capsys)
    assert not (tmp_path / "o").exists()


# ---- docs/reliability.md ----------------------------------------------------------------------


def test_every_row_of_the_reliability_table_names_an_existing_test():
    rows = [line for line in (REPO / "docs" / "reliability.md").read_text().splitlines() if re.match(r"\| *\d+ *\|", line)]
    assert len(rows) >= 20
    for row in rows:
        names = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]]*\])?`", row)
        assert names, f"no test named in: {row}"
        for path, test in names:
            assert re.search(rf"^def {test}\(", (REPO / path).read_text(), re.M), f"{path}::{test} does not exist"
