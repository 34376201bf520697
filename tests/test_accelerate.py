"""Data-parallel router tuning under ``accelerate launch``: two CPU processes, one result."""

from __future__ import annotations

import json
import textwrap

from conftest import accelerate_launch, assert_same_tensors, tiny_model
from safetensors.torch import load_file

# Each rank trains, then saves the routers it ends with; DDP must have kept them identical.
SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    from accelerate import PartialState
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from skipgpt.config import TuneConfig
    from skipgpt.routing.save_load import routers_state_dict
    from skipgpt.training.tune import tune_routers

    model_dir, out = sys.argv[1], Path(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    ids = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    cfg = TuneConfig(target=0.3, steps=4, batch_size=2, seq_len=16, lr=1e-2, save_every=2)
    tune_routers(model, ids, cfg, out, calib_ids=calib, progress=False)
    state = PartialState()  # only after tune_routers: its Accelerator decides the (CPU) backend
    assert state.num_processes == 2, state
    save_file(routers_state_dict(model), str(out / f"rank{state.process_index}.safetensors"))
    """
)


def test_two_process_cpu_tuning(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    (tmp_path / "train.py").write_text(SCRIPT)
    out = tmp_path / "out"
    proc = accelerate_launch([str(tmp_path / "train.py"), str(tmp_path / "model"), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["tokens_trained"] == 4 * 2 * 2 * 16  # steps x batch x processes x seq_len
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [0, 1, 2, 3]  # written once, by the main process

    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert_same_tensors(rank0, rank1)
    assert_same_tensors(load_file(str(out / "routers.safetensors")), rank0)
    assert not (out / "checkpoint").exists()
