"""Filling and checking the DeepSpeed JSON (pure functions; the trainer tests run them for real)."""

import dataclasses
import json

import pytest
from conftest import ROOT

from dsllm.ds_config import DSConfigError, resolve_batch
from dsllm.ds_config import resolve_ds_config as resolve_with_width
from dsllm.train_config import TrainConfig

RUN = TrainConfig(ds_config="x.json", lr=6e-4, warmup_steps=10, max_steps=100)
HIDDEN = 768  # the model's d_model


def RunValues(hidden_size=HIDDEN, **values):  # noqa: N802 -- the run's values and the model width, as before
    return dataclasses.replace(RUN, **values), hidden_size


def resolve_ds_config(raw, run, *args, **kwargs):
    config, hidden = run if isinstance(run, tuple) else (run, HIDDEN)
    return resolve_with_width(raw, config, *args, hidden_size=hidden, **kwargs)


def load(name):
    return json.loads((ROOT / "ds_configs" / name).read_text())


def test_every_shipped_config_resolves_completely():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        config, batch, precision, stage = resolve_ds_config(load(path.name), RUN, 2, path.name, True, True)
        assert "auto" not in json.dumps(config), path.name
        assert config["train_batch_size"] == 16 and batch.micro == 8 and precision == "bf16"
        assert config["optimizer"]["params"]["lr"] == 6e-4 and config["optimizer"]["params"]["betas"] == [0.9, 0.95]
        assert config["scheduler"]["params"]["total_num_steps"] == 100
        assert config["scheduler"]["params"]["warmup_num_steps"] == 10
        assert config["scheduler"]["params"]["cos_min_ratio"] == 0.1
        assert (
            config["gradient_clipping"] == 1.0
            and config["bf16"]["enabled"] is True
            and config["fp16"]["enabled"] is False
        )
        assert stage == config["zero_optimization"]["stage"]
        if stage == 3:  # buckets sized to the model (d_model 768), not DeepSpeed's fixed 5e8 elements
            zero = config["zero_optimization"]
            assert zero["reduce_bucket_size"] == 768 * 768 and zero["stage3_prefetch_bucket_size"] == int(
                0.9 * 768 * 768
            )
            assert zero["stage3_param_persistence_threshold"] == 7680


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_request():
    config, _, precision, _ = resolve_ds_config(load("zero2.json"), RUN, 2, "zero2.json", True, False)
    assert precision == "fp32" and config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    run = RunValues(precision="bf16")
    config, _, precision, _ = resolve_ds_config(load("zero2.json"), run, 2, "zero2.json", True, False)
    assert precision == "bf16" and config["bf16"]["enabled"] is True


def test_fp16_on_a_gpu_without_bf16_keeps_loss_scaling():
    config, _, precision, _ = resolve_ds_config(
        load("zero2.json"), RUN, 8, "zero2.json", supports_bf16=False, has_gpu=True
    )
    assert precision == "fp16" and config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False
    assert config["fp16"]["loss_scale"] == 0 and config["fp16"]["initial_scale_power"] == 16  # dynamic scaling
    config, _, precision, _ = resolve_ds_config(
        load("zero3.json"),
        RunValues(precision="fp16"),
        1,
        "zero3.json",
        supports_bf16=True,
        has_gpu=True,
    )
    assert precision == "fp16" and config["fp16"]["enabled"] is True


@pytest.mark.parametrize(
    "given, world, expected",
    [
        (dict(), 4, (8, 1)),
        (dict(micro_batch_size=2, grad_accum=4), 2, (2, 4)),
        (dict(global_batch_size=64), 4, (16, 1)),
        (dict(global_batch_size=64, micro_batch_size=4), 4, (4, 4)),
        (dict(global_batch_size=64, grad_accum=2), 4, (8, 2)),
    ],
)
def test_batch_is_derived_from_whatever_is_given(given, world, expected):
    batch = resolve_batch(
        {}, given.get("micro_batch_size"), given.get("grad_accum"), given.get("global_batch_size"), world, "x.json"
    )
    assert (batch.micro, batch.accumulation) == expected
    assert batch.global_size == batch.micro * batch.accumulation * world


def test_batch_that_does_not_divide():
    with pytest.raises(DSConfigError, match="train_batch_size 10 != .* world size 4"):
        resolve_batch({}, 2, None, 10, 4, "x.json")


def test_auto_buckets_follow_the_model_width():
    raw = load("zero2.json")
    raw["zero_optimization"]["reduce_bucket_size"] = "auto"
    config, *_ = resolve_ds_config(raw, RUN, 2, "zero2.json", True, True)
    assert config["zero_optimization"]["reduce_bucket_size"] == 768 * 768  # d_model squared, as HF Trainer's "auto"
    with pytest.raises(DSConfigError, match="zero_optimization.reduce_bucket_size"):  # nothing to size it from
        resolve_ds_config(raw, RunValues(hidden_size=None), 2, "zero2.json", True, True)


def test_optimizer_option_fills_the_section_a_json_leaves_out():
    raw = {k: v for k, v in load("zero2.json").items() if k != "optimizer"}
    muon = dataclasses.replace(RUN, optimizer="muon", muon_lr=0.03, muon_momentum=0.9, weight_decay=0.05)
    config, *_ = resolve_ds_config(raw, muon, 2, "x.json", True, True)
    config_muon = config["optimizer"]
    assert config["optimizer"] == {
        "type": "Muon",
        "params": {
            "lr": 6e-4,
            "muon_lr": 0.03,
            "momentum": 0.9,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": 0.05,
        },
    }
    lion = dataclasses.replace(RUN, optimizer="lion", lr=1e-4, beta2=0.99)
    config, *_ = resolve_ds_config(raw, lion, 2, "x.json", True, True)
    assert config["optimizer"] == {"type": "Lion", "params": {"lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.1}}
    config, *_ = resolve_ds_config(raw, RUN, 2, "x.json", True, True)
    assert "optimizer" not in config  # adamw: build_engine's torch AdamW, as before
    own = {**raw, "optimizer": {"type": "Muon", "params": {"lr": "auto", "muon_lr": "auto", "momentum": 0.8}}}
    config, *_ = resolve_ds_config(own, muon, 2, "x.json", True, True)  # the JSON's Muon: its values win
    assert config["optimizer"]["params"] == {"lr": 6e-4, "muon_lr": 0.03, "momentum": 0.8}
    shipped, *_ = resolve_ds_config(load("zero2.json"), muon, 2, "zero2.json", True, True)  # AdamW, lr "auto"
    assert shipped["optimizer"] == config_muon  # left to dsllm's options: --optimizer replaces it
    fixed = {**raw, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}  # values of its own: the file decides
    with pytest.raises(DSConfigError, match=r"--optimizer muon: zero2.json names its own optimizer \(AdamW\)"):
        resolve_ds_config(fixed, muon, 2, "zero2.json", True, True)
    typo = {**raw, "optimizer": {"type": "Muon", "params": {"muon_lrr": 0.02}}}
    with pytest.raises(DSConfigError, match=r"optimizer.params.muon_lrr: not a parameter of Muon .*did you mean"):
        resolve_ds_config(typo, RUN, 2, "x.json", True, True)
