"""Zero-shot accuracy through lm-evaluation-harness on a tiny model, offline, from local files
in the real layouts (skipgpt/evaluation/zeroshot_tasks.py)."""

from __future__ import annotations

import bz2
import json

import pytest
import torch
from conftest import tiny_model

from skipgpt import RouterConfig, SkipGPTError, attach_routers
from skipgpt.cli import main
from skipgpt.evaluation import zeroshot, zeroshot_tasks

pytest.importorskip("lm_eval")

N = 5
PIQA = [
    ({"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid."}, 0),
    ({"goal": "dry wet shoes", "sol1": "put them in water", "sol2": "stuff them with paper"}, 1),
    ({"goal": "To cut bread,", "sol1": "use a knife.", "sol2": "use a spoon."}, 0),
    ({"goal": "Keep ice cold", "sol1": "leave it in the sun", "sol2": "put it in a freezer"}, 1),
    ({"goal": "Light a room", "sol1": "switch on a lamp", "sol2": "close the door"}, 0),
]
ARC = [
    ("Which is a liquid?", ["ice", "water", "stone", "wood"], "B"),
    ("What gives us light by day?", ["the Sun", "the Moon", "a rock"], "A"),
    ("Which animal can fly?", ["cat", "dog", "bird", "fish"], "C"),
    ("What do plants need?", ["light", "plastic", "metal", "glass"], "A"),
    ("Which is hot?", ["snow", "ice", "fire", "rain"], "C"),
]


def char_tokenizer():
    """A real HF fast tokenizer (lm-eval needs one) over printable ASCII: 97 ids < the tiny vocab 128."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def write_piqa(root, rows=PIQA):
    d = root / "zeroshot" / "piqa"
    d.mkdir(parents=True)
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
    (d / "valid-labels.lst").write_text("".join(f"{label}\n" for _, label in rows))


def write_arc(root, rows=ARC):
    d = root / "zeroshot" / "arc_easy"
    d.mkdir(parents=True)
    lines = [{"id": f"q{i}", "question": {"stem": q, "choices": [{"text": t, "label": "ABCD"[k]} for k, t in enumerate(ch)]},
              "answerKey": key} for i, (q, ch, key) in enumerate(rows)]
    (d / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def write_other_layouts(root):
    """Two examples each of the layouts not used end to end: HellaSwag text.bz2, MosaicML
    WinoGrande, OpenBookQA TSV, SuperGLUE BoolQ, ARC-Challenge."""
    z = root / "zeroshot"
    for name in ("hellaswag", "winogrande", "openbookqa", "boolq", "arc_challenge"):
        (z / name).mkdir(parents=True)
    hs = ["Roof shingle removal: A man is sitting on a roof. he", "3", "is using wrap.", "is ripping tiles off.",
          "is holding a cube.", "starts pulling up roofing on a roof.",
          "Home: How to clean [title] a window. Use a cloth [step] wipe it.", "0", "wipes it.", "b", "c", "d"]
    (z / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(("\n".join(hs) + "\n").encode()))
    wg = [{"context_options": ["Sarah was a better surgeon than Maria so Sarah", "Sarah was a better surgeon than Maria so Maria"],
           "continuation": "always got the easier cases.", "gold": 1}] * 2
    (z / "winogrande" / "winogrande.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wg))
    obqa = ("ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
            "1129\tThere is most likely going to be fog around:\t(A) a marsh (B) a tundra (C) the plains (D) a desert\tx\tA\n"
            "7-1\tSun is a\t(A) star (B) planet (C) moon (D) comet\tx\tA\n")
    (z / "openbookqa" / "test.tsv").write_text(obqa)
    bq = [{"question": "is the sky blue", "passage": "Sky -- The sky is blue.", "idx": 0, "label": "true"},
          {"question": "is fire cold", "passage": "Fire -- Fire is hot.", "idx": 1, "label": "false"}]
    (z / "boolq" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bq))
    arc = {"id": "c1", "question": {"stem": "Pick two", "choices": [{"text": "one", "label": "1"}, {"text": "two", "label": "2"}]},
           "answerKey": "2"}
    (z / "arc_challenge" / "ARC-Challenge-Test.jsonl").write_text(json.dumps(arc) + "\n" + json.dumps(arc) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs_data")
    write_piqa(root)
    write_arc(root)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zs_cache")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def run(model, tokenizer, data_dir, cache, tasks="piqa,arc_easy", **kw):
    return zeroshot.evaluate_tasks(model, tokenizer, tasks, data_dir=data_dir, cache_dir=cache, **kw)


def check_scores(result, tasks=("piqa", "arc_easy")):
    for name in tasks:
        r = result[name]
        assert r["metric"] == zeroshot_tasks.PAPER_METRICS[name]
        assert 0.0 <= r["value"] <= 1.0 and r["n"] == N
        assert r["value"] == r["metrics"][r["metric"]] and {"acc", "acc_norm"} <= set(r["metrics"])


def test_converted_files_feed_lm_evals_builtin_prompts(tmp_path):
    """Every layout becomes the fields lm-eval's builtin task reads, and the harness builds its own prompts from them."""
    import yaml
    from lm_eval.tasks import TaskManager

    write_piqa(tmp_path)
    write_arc(tmp_path)
    write_other_layouts(tmp_path)
    present, skipped = zeroshot_tasks.find_task_files("all", tmp_path)
    assert set(present) == set(zeroshot_tasks.TASKS) and not skipped
    for name, paths in present.items():
        cfg = zeroshot_tasks.task_config(name, zeroshot_tasks.prepare_task_data(name, paths, tmp_path / "cache"), tmp_path / "cache" / "hf")
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    tasks = TaskManager(include_defaults=False, include_path=str(tmp_path)).load(list(present))["tasks"]

    def first(name):
        task = tasks[name]
        doc = next(iter(task.eval_docs))
        return task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)

    assert first("piqa") == ("Question: How do I open a jar?\nAnswer:", ["Twist the lid.", "Eat the lid."], 0)
    assert first("arc_easy") == ("Question: Which is a liquid?\nAnswer:", ["ice", "water", "stone", "wood"], 1)
    assert first("arc_challenge") == ("Question: Pick two\nAnswer:", ["one", "two"], 1)
    assert first("openbookqa") == ("There is most likely going to be fog around:", ["a marsh", "a tundra", "the plains", "a desert"], 0)
    assert first("boolq") == ("Sky -- The sky is blue.\nQuestion: is the sky blue?\nAnswer:", ["no", "yes"], 1)
    # lm-eval's own HellaSwag cleaning still runs (here on the second task: [title] and [step]).
    assert first("hellaswag") == ("Roof shingle removal: A man is sitting on a roof. he",
                                  ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing on a roof."], 3)
    second = list(tasks["hellaswag"].eval_docs)[1]
    assert tasks["hellaswag"].doc_to_text(second) == "Home: How to clean. a window. Use a cloth wipe it."
    # WinoGrande: lm-eval's partial scoring, the two contexts with the option filled in and the shared continuation.
    task = tasks["winogrande"]
    doc = next(iter(task.eval_docs))
    assert task.doc_to_text(doc) == 1
    assert task.doc_to_choice(doc) == ["Sarah was a better surgeon than Maria so Sarah", "Sarah was a better surgeon than Maria so Maria"]
    assert task.doc_to_target(doc) == "always got the easier cases."


@pytest.fixture(scope="module")
def dense_result(data_dir, cache, tokenizer):
    return run(tiny_model(), tokenizer, data_dir, cache, tasks="piqa,arc_easy,winogrande", loglikelihoods=True)


def test_dense_end_to_end_and_missing_task_skipped(dense_result, data_dir):
    check_scores(dense_result)
    assert dense_result["sparsity"] is None and dense_result["piqa"]["sparsity"] is None
    assert set(zeroshot.task_names(dense_result)) == {"piqa", "arc_easy"}
    message = dense_result["skipped"]["winogrande"]
    assert "skipping winogrande" in message and str(data_dir / "zeroshot/winogrande/winogrande.jsonl") in message
    assert dense_result["average"] == pytest.approx((dense_result["piqa"]["value"] + dense_result["arc_easy"]["value"]) / 2)
    assert "piqa" in zeroshot.report(dense_result, "dense")


def test_seeded_sample_scores_the_same_examples_and_keeps_each_one(dense_result, data_dir, cache, tokenizer):
    """``sample`` scores a seeded subset (the same in every run and process), and each example's
    correctness and number of choices are kept, so rows can be compared paired."""
    picked = zeroshot.sample_indices("arc_easy", N, 3, seed=0)
    assert picked == sorted(picked) and len(set(picked)) == 3 and picked == zeroshot.sample_indices("arc_easy", N, 3, seed=0)
    assert {tuple(zeroshot.sample_indices("arc_easy", 1000, 5, seed=s)) for s in range(4)}.__len__() == 4
    assert zeroshot.sample_indices("piqa", N, 50) == list(range(N))  # a task smaller than the sample: all of it
    result = run(tiny_model(), tokenizer, data_dir, cache, tasks="piqa,arc_easy", sample=3)
    for name in ("piqa", "arc_easy"):
        ex = result[name]["examples"]
        assert ex["doc_ids"] == zeroshot.sample_indices(name, N, 3) and result[name]["n"] == 3
        assert result[name]["sample"] == {"size": 3, "seed": 0, "of": N}
        assert result[name]["value"] == pytest.approx(sum(ex["correct"]) / 3)
        # The same model scores each sampled example exactly as in the full run.
        full = dense_result[name]["examples"]
        assert ex["correct"] == [full["correct"][full["doc_ids"].index(i)] for i in ex["doc_ids"]]
    assert dense_result["arc_easy"]["examples"]["n_choices"] == [len(ch) for _, ch, _ in ARC]
    assert dense_result["piqa"]["examples"]["n_choices"] == [2] * N
    with pytest.raises(SkipGPTError, match="either limit"):
        run(tiny_model(), tokenizer, data_dir, cache, tasks="piqa", sample=3, limit=3)


def routed_model():
    model = tiny_model()
    attach_routers(model, RouterConfig(init_bias=0.0))  # random routers: a good share of modules skipped
    return model


def test_routed_is_driven_by_the_harness_and_padding_is_not_counted(dense_result, data_dir, cache, tokenizer):
    model = routed_model()
    real_tokens, padded = [], []

    def spy(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        real_tokens.append(int(ids.numel() if mask is None else mask.sum()))
        padded.append(mask is not None and not bool(mask.all()))

    hook = model.register_forward_pre_hook(spy, with_kwargs=True)
    batched = run(model, tokenizer, data_dir, cache, batch_size=N, loglikelihoods=True)
    assert any(padded), "the batched run should have padded something"
    tokens_batched = sum(real_tokens)
    real_tokens.clear()
    single = run(model, tokenizer, data_dir, cache, batch_size=1)  # no padding at all
    hook.remove()

    check_scores(batched)
    s = batched["sparsity"]
    assert 0.05 < s["param_ratio"] < 0.95 and 0 < s["attn_sparsity"] < 1 and 0 < s["mlp_sparsity"] < 1
    # Sparsity counts exactly the real tokens the harness fed, and equals the unpadded run's.
    assert s["tokens"] == tokens_batched == sum(real_tokens) == single["sparsity"]["tokens"]
    assert s["param_ratio"] == pytest.approx(single["sparsity"]["param_ratio"], abs=1e-9)
    assert batched["piqa"]["sparsity"]["tokens"] + batched["arc_easy"]["sparsity"]["tokens"] == s["tokens"]
    for name in ("piqa", "arc_easy"):
        assert batched[name]["metrics"] == pytest.approx(single[name]["metrics"])
    # Skipping changes what the model computes: the harness's log-likelihoods are not the dense model's.
    for name in ("piqa", "arc_easy"):
        routed_ll, dense_ll = torch.tensor(sum(batched[name]["loglikelihoods"], [])), torch.tensor(sum(dense_result[name]["loglikelihoods"], []))
        assert routed_ll.shape == dense_ll.shape == (10 if name == "piqa" else 19,)
        assert (routed_ll - dense_ll).abs().max() > 1e-3
    assert model.skipgpt_state.mode == "argmax" and model.skipgpt_state.meter is None


def test_a_stopped_evaluation_resumes_at_the_task_it_was_in(data_dir, cache, tokenizer, tmp_path, monkeypatch):
    """``resume_dir`` keeps each finished task; a second call scores only the missing one and gives
    the whole result, the ratio over all tasks included, as one uninterrupted call does."""
    model = routed_model()
    resume = tmp_path / "partial"
    straight = run(model, tokenizer, data_dir, cache, sample=3)
    first = run(model, tokenizer, data_dir, cache, sample=3, resume_dir=resume)
    assert sorted(p.name for p in resume.iterdir()) == ["arc_easy.json", "piqa.json"]
    (resume / "arc_easy.json").unlink()  # a stop during arc_easy: piqa finished
    import lm_eval

    calls = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: calls.append(kw["tasks"]) or real(**kw))
    resumed = run(model, tokenizer, data_dir, cache, sample=3, resume_dir=resume)
    assert calls == [["arc_easy"]]
    for result in (first, resumed):
        for name in ("piqa", "arc_easy"):
            assert {k: v for k, v in result[name].items() if k != "wall_s"} == \
                {k: v for k, v in straight[name].items() if k != "wall_s"}
        assert result["sparsity"] == straight["sparsity"] and result["average"] == straight["average"]  # counts: exact
    # A file written for other examples is not taken as this call's.
    calls.clear()
    other = run(model, tokenizer, data_dir, cache, tasks="piqa", sample=2, resume_dir=resume)
    assert calls == [["piqa"]] and other["piqa"]["n"] == 2


def test_errors(tmp_path, monkeypatch, tokenizer):
    monkeypatch.delenv("SKIPGPT_DATA_DIR", raising=False)
    with pytest.raises(SkipGPTError, match="SKIPGPT_DATA_DIR"):
        zeroshot_tasks.find_task_files(["piqa"])
    with pytest.raises(SkipGPTError, match=r"none of the zero-shot tasks.*zeroshot/piqa/valid.jsonl"):
        zeroshot_tasks.find_task_files(["piqa"], tmp_path)
    with pytest.raises(SkipGPTError, match="unknown zero-shot task"):
        zeroshot_tasks.resolve_tasks("piqa,mmlu")
    assert zeroshot_tasks.resolve_tasks("all") == list(zeroshot_tasks.TASKS)


def test_cli_eval_tasks(tmp_path, data_dir, monkeypatch, capsys, tokenizer):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(model_dir), "--tasks", "piqa,arc_easy", "--limit", "3", "--data-dir", str(data_dir)]
    assert main([*args, "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["zeroshot"]  # --tasks alone: no perplexity
    assert results["zeroshot"]["piqa"]["n"] == 3 and results["zeroshot"]["arc_easy"]["limit"] == 3
    assert "dense / piqa" in capsys.readouterr().out
    monkeypatch.delenv("SKIPGPT_DATA_DIR", raising=False)
    assert main(["eval", "--model", str(model_dir), "--tasks", "piqa"]) == 2  # no data directory
    assert "SKIPGPT_DATA_DIR" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", "nope", "--data-dir", str(data_dir)]) == 2
    assert main(["eval", "--model", str(model_dir), "--data", "", "--data-dir", str(data_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_compare_adds_zero_shot_columns(tmp_path, data_dir, monkeypatch, tokenizer):
    """`skipgpt compare --tasks` scores every row with the same harness, beside perplexity."""
    from conftest import write_word_text

    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train = tmp_path / "train.txt"
    train.write_text("the cat sat on the mat and looked at the dog. " * 400)
    test = write_word_text(tmp_path / "test.txt", 200)
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(model_dir), "--ratio", "0.34", "--methods", "shortgpt", "--data", str(train),
                 "--eval", str(test), "--seq-len", "16", "--calib-sequences", "2", "--calib-seq-len", "32",
                 "--tasks", "piqa,arc_easy", "--sample", "3", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "shortgpt"]
    assert all(0.0 <= r["zeroshot"]["piqa"] <= 1.0 and r["eval"]["zeroshot"]["piqa"]["n"] == 3 for r in rows)
    assert "piqa (%)" in (out / "comparison.md").read_text()
    # Every row scored the same seeded examples, so the scoreboard compares them to dense paired.
    for r in rows:
        assert r["zeroshot_examples"]["piqa"]["doc_ids"] == zeroshot.sample_indices("piqa", N, 3)
        assert "examples" not in r["eval"]["zeroshot"]["piqa"]  # kept once, beside
    board = json.loads((out / "scoreboard.json").read_text())
    dense, pruned = board["rows"]
    assert dense["zeroshot_stats"]["diff_to_dense"] is None and dense["zeroshot_stats"]["tasks"]["piqa"]["n"] == 3
    stats = pruned["zeroshot_stats"]
    lo, hi = stats["diff_ci95"]
    assert stats["diff_to_dense"] == pytest.approx(stats["average"] - dense["zeroshot_stats"]["average"]) and lo <= stats["diff_to_dense"] <= hi
    assert "seeded subset (seed 0) of 3" in (out / "scoreboard.md").read_text()
    assert main(["compare", "--model", str(model_dir), "--data", str(train), "--eval", str(test), "--tasks", "piqa",
                 "--sample", "3", "--limit", "3", "--data-dir", str(data_dir), "--out", str(tmp_path / "x")]) == 2
