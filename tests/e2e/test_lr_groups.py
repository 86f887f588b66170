"""The embedding and head learning-rate / weight-decay groups (--embedding-lr-scale, --head-lr-scale,
--embedding-weight-decay) in a real DeepSpeed engine on one rank: each group starts at --lr x its scale with its own
weight decay, and the schedule moves every group by the same factor, under dsllm's own schedule (torch AdamW +
LambdaLR, a JSON without optimizer and scheduler) and under the shipped JSON's (DeepSpeed's AdamW + WarmupCosineLR,
ZeRO-2)."""

import json

import pytest
from conftest import ROOT
from runs import script_result

SCRIPT = r"""
import json, sys
import torch

from dsllm.engine import build_engine, engine_options, init_distributed, lr_factor, window_loss
from dsllm.optimizer import param_groups
from dsllm.model import GPT
from dsllm.pretrain import make_loader, preflight
from dsllm.train_config import TrainConfig
from dsllm.run_control import end_process_group

data, out, *configs = sys.argv[1:]
results, device = {}, None
for ds in configs:
    config = TrainConfig(ds_config=ds, data=data, out=out, model="tiny", seq_len=32, micro_batch_size=2, grad_accum=1,
                         max_steps=10, warmup_steps=2, resume="none", loader_workers=0, precision="fp32", lr=2e-3,
                         weight_decay=0.1, embedding_lr_scale=4.0, head_lr_scale=0.5, embedding_weight_decay=0.01,
                         model_overrides={"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
                                          "max_seq_len": 64, "mlp_multiple_of": 32, "tie_embeddings": False,
                                          "positions": "learned"})
    plan = preflight(config)
    device = device or init_distributed(plan.spec.world, config.collective_timeout)
    torch.manual_seed(config.seed)
    model = GPT(plan.spec.model)
    names = {id(p): name for name, p in model.named_parameters()}
    engine = build_engine(plan.spec, model, device, window_loss, **engine_options(config))
    batches = iter(make_loader(plan, device))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lrs = []
    for _ in range(4):
        lrs.append({g["name"]: g["lr"] for g in engine.ds.optimizer.param_groups})
        engine.train_batch(batches)
    lrs.append({g["name"]: g["lr"] for g in engine.ds.optimizer.param_groups})
    # (ZeRO's optimizer holds flat copies: its groups' members are those of the groups it was given)
    given = param_groups(model, 0.1, 2e-3, **engine_options(config)["lr_groups"])
    groups = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in given}
    factors = [lr_factor(config.lr_schedule())(s) for s in range(5)]
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()}
    results[ds] = {"lrs": lrs, "groups": groups, "given": len(given), "factors": factors, "engine_lr": engine.lr(),
                   "moved": moved, "wd": {g["name"]: g["weight_decay"] for g in engine.ds.optimizer.param_groups}}
    engine.ds.destroy()
print("RESULT " + json.dumps(results))
end_process_group()
"""


@pytest.fixture(scope="module")
def lr_groups(dataset_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lr_groups")
    own = json.loads((ROOT / "ds_configs" / "zero1.json").read_text())
    del own["optimizer"], own["scheduler"]  # dsllm's schedule: torch AdamW and LambdaLR
    (tmp / "own_schedule.json").write_text(json.dumps(own))
    configs = [str(tmp / "own_schedule.json"), str(ROOT / "ds_configs" / "zero2.json")]
    results = script_result(SCRIPT, dataset_dir, tmp / "run", *configs)
    return list(results.values())


SCALES = {"decay": 1.0, "no_decay": 1.0, "embedding": 4.0, "head": 0.5}


def test_each_group_has_its_lr_and_weight_decay_and_the_schedule_scales_them_all(lr_groups):
    own, shipped = lr_groups
    groups = own["groups"]
    assert groups["embedding"] == ["pos_embeddings.weight", "tok_embeddings.weight"]
    assert groups["head"] == ["lm_head.weight"]
    assert groups["decay"] and all("norm" not in name and "embeddings" not in name for name in groups["decay"])
    assert groups["no_decay"] and all("norm" in name for name in groups["no_decay"])
    for run in (own, shipped):
        assert len(run["lrs"][0]) == run["given"] == 4
        assert run["wd"] == {"decay": 0.1, "no_decay": 0.0, "embedding": 0.01, "head": 0.1}
        assert run["engine_lr"] == pytest.approx(run["lrs"][-1]["decay"])  # the logged lr: the matrices' group
        moving = [lrs for lrs in run["lrs"] if lrs["decay"] > 0]  # (DeepSpeed's WarmupCosineLR: 0 at steps 0, 1)
        assert len(moving) >= 3
        for lrs in moving:
            for name, scale in SCALES.items():
                assert lrs[name] == pytest.approx(lrs["decay"] * scale, rel=1e-9)
        assert len({round(lrs["decay"], 12) for lrs in run["lrs"]}) >= 4  # the schedule moved them
    # dsllm's schedule: each group's lr after N steps is its base (--lr x scale) x the schedule's factor at N
    for step, (lrs, factor) in enumerate(zip(own["lrs"], own["factors"])):
        for name, scale in SCALES.items():
            assert lrs[name] == pytest.approx(2e-3 * scale * factor, rel=1e-9), (step, name)
    assert all(moved > 0 for moved in own["moved"].values())  # every group trained
