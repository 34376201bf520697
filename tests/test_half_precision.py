"""A model held in bfloat16 or float16 (``--dtype``), not only autocast: every stage runs, and what
skipgpt adds keeps float32 weights and float32 decisions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids, save_tiny_model_dir, tiny_model
from safetensors.torch import load_file

from skipgpt import RouterConfig, attach_routers, routing_state
from skipgpt.config import TuneConfig
from skipgpt.inference.export import export_model
from skipgpt.models import load_model
from skipgpt.routing.routers import rms_normalised
from skipgpt.routing.save_load import save_routers
from skipgpt.routing.surgery import router_parameters
from skipgpt.training.finetune import FinetuneConfig, finetune
from skipgpt.training.tune import tune_routers

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
def test_tuning_a_half_precision_model_keeps_float32_routers(tmp_path, dtype, device):
    model = tiny_model("qwen3").to(device, dtype)
    cfg = TuneConfig(steps=3, batch_size=2, seq_len=16, lr=1e-2, save_every=3, fit_sequences=4)
    results = tune_routers(model, random_ids(8, 16), cfg, tmp_path, calib_ids=random_ids(2, 64, seed=1), progress=False)
    assert all(p.dtype == torch.float32 and p.device.type == torch.device(device).type for p in router_parameters(model))
    assert all(torch.isfinite(torch.tensor(v)) for k, v in results["last_step"].items() if isinstance(v, float))
    assert results["replacement_fit"]["explained_mlp"] > 0.0  # the fit ran on the half-precision model
    assert next(p for n, p in model.named_parameters() if "skip_routers" not in n).dtype == dtype  # the base is untouched
    assert 0.0 <= results["calibration"]["ratio_after"] < 1.0


@pytest.mark.parametrize("dtype", HALF)
def test_rt_l_on_a_half_precision_model_trains_float32_lora(tmp_path, dtype, device):
    model = attach_routers(tiny_model("llama"), RouterConfig(init_bias=0.5, replacement_rank=2)).to(device, dtype)
    cfg = FinetuneConfig(steps=3, batch_size=2, seq_len=16, save_every=3, train_replacements=True)
    peft_model, results = finetune(model, random_ids(8, 16), cfg, tmp_path, progress=False)
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert torch.isfinite(torch.tensor(results["last_step"]["loss"]))


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_export_keeps_the_checkpoints_dtype(tmp_path, dtype):
    """A bf16 checkpoint exports as bf16 whatever the device (``auto``), or as asked."""
    model_dir = save_tiny_model_dir(tmp_path / "model")
    model, _ = load_model(str(model_dir))
    model.to(torch.bfloat16).save_pretrained(model_dir)  # the checkpoint is now bf16
    attach_routers(model, RouterConfig(init_bias=0.5))
    save_routers(model, tmp_path / "routers")
    out = export_model(str(model_dir), tmp_path / "export", routers=str(tmp_path / "routers"), dtype=dtype)
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for k, t in weights.items() if "skip_routers" not in k} == {torch.bfloat16}
    assert {t.dtype for k, t in weights.items() if "skip_routers" in k} == {torch.float32}  # routers decide in float32
    assert json.loads((out / "skipgpt_export.json").read_text())["dtype"] == "bfloat16"
    reloaded, _ = load_model(str(out))  # float32 on this CPU (auto), routers attached and float32
    assert routing_state(reloaded).config.threshold == routing_state(model).config.threshold
    assert {p.dtype for p in router_parameters(reloaded)} == {torch.float32}


def test_the_routers_rms_norm_saves_only_its_input_and_has_autograds_gradient():
    """Routers and replacements read x / rms(x) in float32; under gradient the norm keeps the bf16
    input (which the graph holds anyway) and a scale per token, not float32 copies of d-wide
    tensors, and its gradient is autograd's own."""
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rms_normalised, (x,))
    x = (torch.randn(2, 6, 64) * 30).to(torch.bfloat16).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rms_normalised(x)
    assert y.dtype == torch.float32 and all(t is x or t.shape[-1] == 1 for t in saved)
    g = torch.randn(2, 6, 64)
    (y * g).sum().backward()
    ours, x.grad = x.grad.clone(), None
    xf = x.float()
    ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)) * g).sum().backward()
    assert torch.equal(ours, x.grad)
