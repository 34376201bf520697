"""The skipping engine reads each routed module's decisions from the device once per forward.

A device-to-host read (``.item()``, ``bool(t)``, ``int(t)``, ``nonzero``, boolean-mask indexing,
``.cpu()``, and on CUDA a blocking copy from pageable host memory) makes the host wait until the
device has run everything queued. The engine allows itself one per routed module, the transfer of
its decisions in :func:`skipgpt.routing.execute._to_host`; these tests count that helper's calls
and, with the profiler, every other read: ``aten::_local_scalar_dense`` (what ``item``,
``is_nonzero``, ``bool``, ``int`` end in) and ``aten::nonzero`` (boolean masks included). On CUDA
they also count ``cudaStreamSynchronize``, which must be exactly those two counts together: that
catches reads the CPU profiler cannot name, such as a copy to the GPU from pageable memory. A
``.cpu()`` of a CPU tensor is no op at all, so on the CPU only the helper's count shows the transfer.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import left_padded, tiny_model
from torch.profiler import ProfilerActivity, profile

from skipgpt import RouterConfig, attach_routers, routing_state
from skipgpt.routing import execute as engine

READS = ("aten::_local_scalar_dense", "aten::nonzero")


def routed(arch: str, device: str, attn: str = "sdpa", policy: str = "keep", layers: int = 3) -> torch.nn.Module:
    """Random routers around a zero bias (about half the tokens skip each module) and random
    replacements, so that every gather of the engine runs."""
    attn = "eager" if arch == "gemma2" else attn  # Gemma 2 has no SDPA path (logit soft-capping)
    model = attach_routers(tiny_model(arch, attn=attn, num_hidden_layers=layers),
                           RouterConfig(init_bias=0.0, kv_policy=policy))
    for name, p in model.named_parameters():
        if "skip_routers" in name:
            torch.nn.init.normal_(p, std=1.0 if ".net." in name else 0.1)
    return model.to(device)


def counted_forward(model: torch.nn.Module, monkeypatch, **inputs) -> tuple[Any, tuple[int, int, int | None]]:
    """One cached forward and its (decision transfers, other reads the profiler names, CUDA
    stream syncs or None off CUDA)."""
    cuda = next(model.parameters()).is_cuda
    transfers = []
    to_host = engine._to_host
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(engine, "_to_host", lambda flags: transfers.append(1) or to_host(flags))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            out = model(use_cache=True, **inputs)
    names = [e.name for e in prof.events()]
    syncs = names.count("cudaStreamSynchronize") if cuda else None
    return out, (len(transfers), sum(names.count(op) for op in READS), syncs)


def warm_up(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """A first forward: a router reads its bias difference once per change of its weights."""
    with torch.no_grad():
        model(input_ids=ids[:, :2])


@pytest.mark.parametrize("policy", ["keep", "drop"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_one_host_read_per_routed_module_in_prefill_and_decode(arch, attn, policy, device, monkeypatch):
    """Exactly 2 × layers reads per forward, prefill and every decode step, and nothing else.

    Before (3 layers, batch 3), the engine read 27 to 30 times in the prefill and 12 to 28 times
    per decode step, 22 to 27 for llama (``bool(execute.all())``, ``nonzero`` in the MLP, the
    replacement and the attention's rows, ``int(counts.max())``, ``int(rows.max())``,
    ``bool(valid.any())``, three boolean-mask indexings per attention), against 6 now.
    """
    model = routed(arch, device, attn, policy)
    modules = routing_state(model).num_modules
    ids = torch.randint(3, 128, (3, 14), generator=torch.Generator().manual_seed(0)).to(device)
    warm_up(model, ids)
    out, counted = counted_forward(model, monkeypatch, input_ids=ids[:, :10])
    counts, executed = [counted], [routing_state(model).stacked_gates().mean()]
    for t in range(10, 14):
        out, counted = counted_forward(model, monkeypatch, input_ids=ids[:, t : t + 1], cache=out.cache)
        counts.append(counted)
        executed.append(routing_state(model).stacked_gates().mean())
    syncs = modules if device.startswith("cuda") else None
    assert counts == [(modules, 0, syncs)] * 5
    assert 0.2 < float(torch.stack(executed).mean()) < 0.8  # the skipping path really ran


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_padding_adds_host_reads_per_forward_not_per_module(policy, device, monkeypatch):
    """An attention mask adds reads outside the engine, once per forward whatever the depth:
    ``bool(real.all())`` in ``before_model_forward`` and transformers' own check of the mask
    (its SDPA path asks whether it may drop the mask)."""
    ids, mask = (t.to(device) for t in left_padded(batch=3, length=12))
    reads_at_depth = {}
    for layers in (2, 4):
        model = routed("llama", device, policy=policy, layers=layers)
        warm_up(model, ids)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        mask_next = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        _, (transfers, reads, syncs) = counted_forward(model, monkeypatch, input_ids=out.logits[:, -1:].argmax(-1),
                                                       attention_mask=mask_next, cache=out.cache)
        assert transfers == 2 * layers
        assert syncs is None or syncs == transfers + reads
        reads_at_depth[layers] = reads
    assert reads_at_depth[2] == reads_at_depth[4] <= 2


def test_dense_gate_mode_reads_nothing(device, monkeypatch):
    """Under gate mode ``dense`` (the verifier of speculative decoding) every token executes: no
    module reads its decisions (before, each read them to find that out: 6 reads here)."""
    from skipgpt.routing.surgery import gate_mode

    model = routed("llama", device)
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0)).to(device)
    warm_up(model, ids)
    with gate_mode(model, "dense"):
        _, counted = counted_forward(model, monkeypatch, input_ids=ids)
    assert counted == (0, 0, 0 if device.startswith("cuda") else None)
