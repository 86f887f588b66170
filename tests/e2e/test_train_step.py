"""dsllm.engine.Engine.train_batch, the step the training loop and the throughput benchmark share: it makes no host
sync of its own (no .item() / .tolist() / .cpu() per step) except on ZeRO-0 fp32, the one configuration where
DeepSpeed has no non-finite check and the loop must read the loss flag before stepping."""

import pytest
from conftest import ROOT
from runs import SMALL_MODEL, script_result

SCRIPT = r"""
import json, sys
from pathlib import Path

import torch.distributed as dist

import dsllm
import torch

from dsllm.engine import build_engine, engine_options, init_distributed, window_loss
from dsllm.model import GPT
from dsllm.pretrain import make_loader, preflight
from dsllm.train_config import TrainConfig

ds, data, out, precision, *model = sys.argv[1:]
overrides = dict(zip(model[2::2], model[3::2]))  # after "--model tiny": --model.FIELD VALUE pairs
overrides = {k.removeprefix("--model."): v for k, v in overrides.items()}
config = TrainConfig(ds_config=ds, data=data, out=out, model="tiny", model_overrides=overrides, seq_len=32,
                     micro_batch_size=2, grad_accum=2, max_steps=10, resume="none", loader_workers=0,
                     precision=precision)
plan = preflight(config)
device = init_distributed(plan.spec.world, config.collective_timeout)
torch.manual_seed(config.seed)
engine = build_engine(plan.spec, GPT(plan.spec.model), device, window_loss, **engine_options(config))
batches = iter(make_loader(plan, device))
engine.train_batch(batches)  # the first step builds DeepSpeed's lazy buffers
package, syncs = str(Path(dsllm.__file__).parent), []
SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "synchronize"}

def profile(frame, event, arg):
    if event == "c_call" and getattr(arg, "__name__", "") in SYNCING and frame.f_code.co_filename.startswith(package):
        syncs.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {arg.__name__}")

losses = []
sys.setprofile(profile)
for _ in range(3):
    loss, applied = engine.train_batch(batches)
    losses.append((loss, applied))
sys.setprofile(None)
print("RESULT " + json.dumps({"syncs": syncs, "applied": [a for _, a in losses],
                              "losses": [float(l) for l, _ in losses], "on_device": str(losses[0][0].device)}))
engine.ds.destroy()
dist.destroy_process_group()
"""


@pytest.mark.parametrize(
    "ds, precision, expected_syncs",
    [("zero2.json", "fp32", 0), ("zero0.json", "bf16", 0), ("zero3.json", "fp32", 0), ("zero0.json", "fp32", 3)],
)
def test_train_step_makes_no_host_sync_of_its_own(tmp_path, dataset_dir, ds, precision, expected_syncs):
    result = script_result(SCRIPT, ROOT / "ds_configs" / ds, dataset_dir, tmp_path / "run", precision, *SMALL_MODEL)
    assert result["applied"] == [True, True, True] and all(0 < loss < 20 for loss in result["losses"])
    assert len(result["syncs"]) == expected_syncs, result["syncs"]
    # ZeRO-0 fp32: exactly one read per optimizer step (not per micro batch), the finite flag before engine.step()
    assert all(s.startswith("engine.py:") and s.endswith(" item") for s in result["syncs"])
