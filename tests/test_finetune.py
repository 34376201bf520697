"""Stage 2 (LoRA with frozen routers), the joint and dense variants, and the exported model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_parameters, left_padded, random_ids, router_tensors, save_tiny_model_dir, tiny_model
from transformers import AutoModelForCausalLM

import skipgpt.training.finetune
from skipgpt import RouterConfig, SkipGPTError, attach_routers, has_routers, load_routers, routing_state, save_routers
from skipgpt.inference.export import export_model
from skipgpt.models import load_model
from skipgpt.lora import load_adapter
from skipgpt.training.finetune import FinetuneConfig, finetune

SMALL = dict(steps=6, batch_size=2, seq_len=16, lr=1e-2, save_every=3)


def routed_tiny(seed: int = 0):
    return attach_routers(tiny_model("llama", seed=seed), RouterConfig(init_bias=0.5))


def run(tmp_path, model, **overrides):
    return finetune(model, random_ids(16, 16), FinetuneConfig(**{**SMALL, **overrides}), tmp_path, progress=False)


def lora_tensors(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def test_rt_l_trains_only_lora_with_frozen_argmax_routers(tmp_path, monkeypatch):
    model = routed_tiny()
    base, routers = base_parameters(model), router_tensors(model)
    modes = []
    real = skipgpt.training.finetune.lm_loss

    def spy(m, *args, **kwargs):
        modes.append(routing_state(model).mode)
        return real(m, *args, **kwargs)

    monkeypatch.setattr(skipgpt.training.finetune, "lm_loss", spy)
    peft_model, results = run(tmp_path, model)
    assert modes == ["argmax"] * 6
    assert all(torch.equal(v, router_tensors(model)[k]) for k, v in routers.items())
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in peft_model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert any(float(p.abs().sum()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)  # LoRA B starts at 0
    assert results["stage"] == "SkipGPT-RT-L"
    assert {"adapter_config.json", "adapter_model.safetensors", "router_config.json", "routers.safetensors",
            "train_log.jsonl", "results.json"} <= {p.name for p in tmp_path.iterdir()}


def test_rt_l_can_train_the_replacements_and_keeps_the_decisions(tmp_path):
    model = routed_tiny()
    routing_state(model).config.threshold = 0.5  # a third of the tokens skip: the replacements get gradients
    routers = router_tensors(model)
    _, results = run(tmp_path, model, train_replacements=True)
    assert results["last_step"]["sparsity"] > 0.1
    changed = {k for k, v in router_tensors(model).items() if not torch.equal(v, routers[k])}
    assert changed and all(".replacement." in k for k in changed)
    reloaded = load_routers(tiny_model("llama"), tmp_path)
    assert all(torch.equal(router_tensors(reloaded)[k], v) for k, v in router_tensors(model).items())
    load_adapter(reloaded, tmp_path)  # the replacements it was trained with
    with pytest.raises(SkipGPTError, match="fine-tuned together with its replacements"):
        load_adapter(routed_tiny(), tmp_path)  # the stage-1 replacements it started from


@pytest.mark.parametrize("mode, replacement", [("joint", "lowrank"), ("routed", "none")])
def test_train_replacements_needs_routers_with_replacements(tmp_path, mode, replacement):
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.5, replacement=replacement))
    with pytest.raises(SkipGPTError, match="train-replacements"):
        run(tmp_path, model, mode=mode, train_replacements=True)


def test_joint_updates_routers_and_lora(tmp_path):
    model = routed_tiny()
    routers = router_tensors(model)
    peft_model, results = run(tmp_path, model, mode="joint")
    assert any(not torch.equal(v, router_tensors(model)[k]) for k, v in routers.items())
    assert any(float(p.abs().sum()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert results["stage"] == "SkipGPT-Joint" and "tau" in results["last_step"]


def test_joint_calibrates_its_threshold_on_held_out_text(tmp_path):
    model = routed_tiny()
    cfg = FinetuneConfig(**{**SMALL, "mode": "joint"})
    cfg.joint.target = 0.3
    _, results = finetune(model, random_ids(16, 16), cfg, tmp_path, calib_ids=random_ids(4, 32, seed=9), progress=False)
    calibration = results["calibration"]
    assert abs(calibration["ratio_after"] - 0.3) < abs(calibration["ratio_before"] - 0.3) or abs(calibration["ratio_after"] - 0.3) < 0.05
    saved = json.loads((tmp_path / "router_config.json").read_text())
    assert saved["router"]["threshold"] == pytest.approx(routing_state(model).config.threshold)


def test_dense_lora_has_no_routers(tmp_path):
    peft_model, results = run(tmp_path, tiny_model("llama"), mode="dense")
    assert not has_routers(peft_model.get_base_model()) and results["router"] is None
    assert not (tmp_path / "router_config.json").exists()


@pytest.mark.parametrize("mode, routed", [("routed", False), ("dense", True)])
def test_mode_and_routers_must_agree(tmp_path, mode, routed):
    model = routed_tiny() if routed else tiny_model("llama")
    with pytest.raises(SkipGPTError):
        run(tmp_path, model, mode=mode)


def test_resumed_finetune_equals_straight_run(tmp_path, monkeypatch):
    straight, _ = run(tmp_path / "a", routed_tiny())
    real, calls = skipgpt.training.finetune.lm_loss, [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(skipgpt.training.finetune, "lm_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", routed_tiny())
    monkeypatch.setattr(skipgpt.training.finetune, "lm_loss", real)
    resumed, _ = finetune(routed_tiny(), random_ids(16, 16), FinetuneConfig(**SMALL), tmp_path / "b", resume=True, progress=False)
    a, b = lora_tensors(straight), lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def trained(tmp_path):
    """A tiny model directory, routers for it, and an RT-L adapter trained on top."""
    model_dir = save_tiny_model_dir(tmp_path / "model")
    model, _ = load_model(str(model_dir))
    attach_routers(model, RouterConfig(init_bias=0.5))
    save_routers(model, tmp_path / "routers")
    run(tmp_path / "adapter", model)
    return model_dir, tmp_path / "routers", tmp_path / "adapter"


def test_export_merges_lora_and_carries_routers(trained, tmp_path):
    model_dir, routers, adapter = trained
    ids = random_ids(2, 12, seed=3)
    reference, _ = load_model(str(model_dir))
    load_routers(reference, routers)
    reference = load_adapter(reference, adapter)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    out = export_model(str(model_dir), tmp_path / "exported", routers=str(routers), adapter=str(adapter))
    exported, _ = load_model(str(out))
    assert has_routers(exported)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(out)  # anyone without skipgpt gets the dense merged model
    assert not has_routers(plain) and not any("skip_routers" in k for k in plain.state_dict())
    info = json.loads((out / "skipgpt_export.json").read_text())
    assert info["lora_merged"] and info["adapter"] == str(adapter)


def test_adapter_for_another_base_is_refused(trained):
    _, _, adapter = trained
    other = tiny_model("llama", hidden_size=48)
    with pytest.raises(SkipGPTError, match="does not fit"):
        load_adapter(other, adapter)


def test_missing_adapter_files_are_refused(tmp_path):
    with pytest.raises(SkipGPTError, match="adapter_config.json"):
        load_adapter(tiny_model("llama"), tmp_path)


def test_bf16_autocast_trains_float32_lora_and_replacements(tmp_path):
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.5, replacement="lowrank", replacement_rank=2))
    peft_model, results = run(tmp_path, model, steps=3, bf16=True, train_replacements=True)
    assert results["finetune"]["bf16"] and torch.isfinite(torch.tensor(results["last_step"]["loss"]))
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)


@pytest.mark.parametrize("path", ["gather", "dense"])
@pytest.mark.parametrize("kv_policy", ["keep", "drop"])
def test_stage_2_trains_through_the_skipping_path_with_the_masked_gradients(arch, kv_policy, device, path):
    """Frozen argmax decisions: gathering the executing tokens is differentiable, so stage 2 runs
    only what executes and its LoRA and replacement gradients equal the masked computation's;
    so are the engine's dense path (``keep``) and whichever the cost model picks."""
    model = attach_routers(tiny_model(arch), RouterConfig(init_bias=0.0, kv_policy=kv_policy)).to(device)
    routing_state(model).engine_path = path
    for name, p in model.named_parameters():
        if "skip_routers" in name and p.dim() == 2 and p.shape[0] == 2:
            torch.nn.init.normal_(p, std=1.0)
    peft_model = skipgpt.training.finetune.add_lora(model, FinetuneConfig(lora_r=4))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # LoRA's B starts at zero: give every path a gradient
        if ".replacement." in name:
            p.requires_grad_(True)
    ids, mask = (t.to(device) for t in left_padded())
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100  # padding runs nothing when skipping: score real inputs only
    state = routing_state(model)
    state.mode = "argmax"
    grads, losses = {}, {}
    for skip in (True, False):
        state.skip_compute = skip
        peft_model.zero_grad(set_to_none=True)
        out = peft_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        losses[skip] = out.loss.detach()
        grads[skip] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    gates = state.stacked_gates()[:, mask.bool()]
    assert 0.2 < float(gates.mean()) < 0.8  # real skipping
    assert torch.allclose(losses[True], losses[False], rtol=1e-5)
    assert grads[True].keys() == grads[False].keys() and any(".replacement." in n for n in grads[True])
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-6, rtol=1e-4), name


def test_rt_l_re_sets_its_threshold_to_the_stage_1_ratio_after_lora(tmp_path):
    """LoRA moves the hidden states the frozen routers read; the threshold is re-set on the
    held-out text so that the fine-tuned model skips what the stage-1 routers skipped there."""
    from skipgpt.training.calibrate import achieved_ratio

    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0))
    for name, p in model.named_parameters():
        if "skip_routers" in name and p.dim() == 2 and p.shape[0] == 2:
            torch.nn.init.normal_(p, std=1.0)
    calib = random_ids(4, 64, seed=5)
    before = achieved_ratio(model, calib, "params")
    peft_model, results = finetune(model, random_ids(16, 16), FinetuneConfig(**{**SMALL, "lr": 5e-2, "steps": 6}), tmp_path,
                                   calib_ids=calib, progress=False)
    cal = results["calibration"]
    assert cal["ratio_stage1"] == pytest.approx(before) and cal["target"] == pytest.approx(before)
    assert cal["ratio_before"] != pytest.approx(before, abs=1e-4)  # the LoRA moved the ratio
    assert achieved_ratio(peft_model, calib, "params") == pytest.approx(before, abs=0.02)
    assert json.loads((tmp_path / "router_config.json").read_text())["router"]["threshold"] == cal["threshold"]

    kept = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.0, threshold=0.3))
    _, results = finetune(kept, random_ids(16, 16), FinetuneConfig(**{**SMALL, "calibrate": False}), tmp_path / "kept",
                          calib_ids=calib, progress=False)
    assert results["calibration"] is None and routing_state(kept).config.threshold == 0.3
    with pytest.raises(SkipGPTError, match="RT-L"):
        FinetuneConfig(mode="joint", target=0.3)
