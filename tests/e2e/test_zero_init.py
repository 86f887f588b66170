"""A model bigger than one host: under ZeRO-3 every rank builds the model inside deepspeed.zero.Init, and a
pipeline stage builds only its own layers (`dsllm.engine.new_model`), so each rank's host memory holds its part,
never the whole fp32 model. Real launcher, 2 real ranks, real model build; the same curves as without it are in
test_pretrain.py and test_pipeline.py."""

import json
import subprocess

import pytest
from conftest import ROOT
from runs import env, free_port

# 24 blocks of d_model 512: 76M parameters, 290 MiB in fp32; no single module above 2 MiB, so the build's peak
# is the partition, not one big layer gathered whole
BIG = {"n_layers": 24, "d_model": 512, "n_heads": 8, "n_kv_heads": 8, "max_seq_len": 64, "mlp_multiple_of": 32}
# glibc's default (dynamic) mmap threshold keeps the freed full-size tensors of each module in the heap, so RSS
# would count memory the rank no longer uses (measured: 300 MiB peak either way); a fixed threshold returns it.
# On a GPU zero.Init creates the parameters on the device: the host never holds them at all.
FREED_MEMORY_RETURNS = "glibc.malloc.mmap_threshold=131072"
SCRIPT = """
import json, re, resource, sys
from pathlib import Path

from dsllm.engine import init_distributed, new_model
from dsllm.pretrain import preflight
from dsllm.run_control import end_process_group
from dsllm.train_config import TrainConfig

data, out, ds, model, layout = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it


def planned(model):
    config = TrainConfig(ds_config=ds, data=data, out=out, model="tiny", model_overrides=model, seq_len=32,
                         micro_batch_size=1, precision="fp32", resume="none", loader_workers=0, **json.loads(layout))
    return preflight(config)


model = json.loads(model)
plan = planned(model)
init_distributed(plan.spec.world, 60)

def rss_mib():
    return int(re.search(r"VmRSS:\\s*(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

# the same layout once at 1/64 of the size first: what any build costs once (code pages, process groups), so what
# is measured next is what the model's size costs
new_model(planned({**model, "d_model": 64, "n_heads": 2, "n_kv_heads": 2}).spec)
before, peak_before = rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
gpt = new_model(plan.spec)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
params = sum(getattr(p, "ds_numel", p.numel()) for p in gpt.parameters())  # a stage's, a tensor rank's shards
local = sum(getattr(p, "ds_tensor", p).numel() for p in gpt.parameters())
result = {"rank": plan.spec.world.rank, "added_mib": rss_mib() - before,
          "peak_added_mib": peak - max(before, peak_before), "params": params, "local": local}
Path(out).mkdir(parents=True, exist_ok=True)  # a file per rank: two ranks' lines on one stdout can interleave
Path(out, f"rank{plan.spec.world.rank}.json").write_text(json.dumps(result))
end_process_group()  # (gloo's threads may otherwise abort the exit: run_control.end_process_group)
"""


def build_memory(dataset_dir, tmp_path, ds: str, layout: dict | None = None, ranks: int = 2) -> list[dict]:
    script, out = tmp_path / "build.py", tmp_path / f"out-{ds}"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), str(dataset_dir),
         str(out), str(ROOT / "ds_configs" / ds), json.dumps(BIG), json.dumps(layout or {})],
        cwd=ROOT, env={**env(), "PYTHONPATH": str(ROOT), "GLIBC_TUNABLES": FREED_MEMORY_RETURNS},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(ranks)]


@pytest.fixture(scope="module")
def whole(dataset_dir, tmp_path_factory):
    """Each rank's build of the full fp32 model (ZeRO-2: every rank holds all of it)."""
    return build_memory(dataset_dir, tmp_path_factory.mktemp("whole"), "zero2.json")


@pytest.mark.multirank
def test_zero3_ranks_build_only_their_partition(dataset_dir, tmp_path, whole):
    parted = build_memory(dataset_dir, tmp_path, "zero3.json")
    params = whole[0]["params"]
    assert params > 70e6 and all(r["params"] == params for r in whole + parted)
    assert all(r["local"] == params for r in whole)
    assert all(r["local"] <= params / 2 + 1e4 for r in parted)  # its partition (padded to the world size)
    model_mib = params * 4 / 2**20
    for full, part in zip(sorted(whole, key=lambda r: r["rank"]), sorted(parted, key=lambda r: r["rank"])):
        assert full["peak_added_mib"] > 0.9 * model_mib, full
        assert part["peak_added_mib"] <= 0.6 * full["peak_added_mib"], (part, full)
        assert part["added_mib"] <= 0.6 * full["added_mib"], (part, full)


LAYOUTS = {
    "pp2": {"pipeline_parallel": 2},
    "tp2": {"tensor_parallel": 2},
    "3d": {"pipeline_parallel": 2, "tensor_parallel": 2},
}


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipeline_stages_and_tensor_ranks_build_only_their_part(dataset_dir, tmp_path, whole, layout):
    """On ZeRO-1, PP=2 and TP=2 on 2 ranks, PP=2 x TP=2 on 4: a stage builds only its layers (half the blocks, and
    the embedding or the head), a tensor rank only its shards (built on the meta device, split there by AutoTP,
    each shard then filled), never the whole model first: at most 0.6x of it on a rank of 2, 0.35x on a rank of 4."""
    share = 0.35 if layout == "3d" else 0.6
    parts = build_memory(dataset_dir, tmp_path, "zero1.json", LAYOUTS[layout], ranks=4 if layout == "3d" else 2)
    params = whole[0]["params"]
    assert sum(r["params"] for r in parts) >= params  # the parts cover the model (replicated norms, tied weight)
    assert all(r["params"] <= share * params for r in parts)
    for part in parts:
        full = whole[part["rank"] % 2]
        assert part["peak_added_mib"] <= share * full["peak_added_mib"], (part, full)
        assert part["added_mib"] <= share * full["added_mib"], (part, full)
