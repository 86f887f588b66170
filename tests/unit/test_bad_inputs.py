"""Bad inputs, one table: each case is a command run the way a user runs it, with one bad value, and the
one line (exit 2) it must answer with. The README's table of bad inputs is generated from these cases
(`make bad-inputs-table`, which runs this file with DSLLM_BAD_INPUTS_RECORD set): add a case here, then
regenerate it.

Most cases call the command's `main` in this process (the same code path as the script, fast); the
cases marked `subprocess=True` run the real entry script."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_user_error
from runs import SMALL_MODEL, env

RECORD_ENV = "DSLLM_BAD_INPUTS_RECORD"  # a JSONL file: each case appends {name, command, input, answer}
PRETRAIN = "launch/pretrain.py"
ZERO2 = ("--ds_config", str(ROOT / "ds_configs" / "zero2.json"))
GOOD_DATA = ("--data", "{data}", "--out", "{tmp}/out")  # a good pretraining command's dataset and run folder
COMMAND_MAINS = {  # the command as a user types it -> (module, main function) it runs
    PRETRAIN: ("dsllm.pretrain", "main"),
    "data_pipeline/prepare.py": ("dsllm.data.prepare", "main"),
    "data_pipeline/merge_shards.py": ("dsllm.data.shards", "main"),
    "tokenizer/train_tokenizer.py": ("dsllm.data.train_tokenizer", "main"),
    "python -m dsllm generate": ("dsllm.generate", "main"),
    "python -m dsllm evaluate": ("dsllm.evaluation", "main"),
    "python -m dsllm plan": ("dsllm.plan", "main"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    bad_input: str  # what is wrong, in words (the README's first column)
    command: str  # a key of COMMAND_MAINS
    args: tuple[str, ...]  # {tmp}, {data} and the names of `files` are filled in
    expect: tuple[str, ...]  # fragments of the one line on stderr
    files: dict[str, Callable[[Path, Path], None]] = dataclasses.field(
        default_factory=dict
    )  # name -> writer(path, data)
    subprocess: bool = False  # run the real script instead of its main() in this process


def ds_json(**changes) -> Callable[[Path, Path], None]:
    """ds_configs/zero2.json with `a__b=value` set (value None for JSON null)."""

    def write(path: Path, _data: Path) -> None:
        config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
        for dotted, value in changes.items():
            node, (*parents, leaf) = config, dotted.split("__")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        path.write_text(json.dumps(config))

    return write


def pretrain_ds(name: str, bad_input: str, expect: tuple[str, ...], **changes) -> Case:
    return Case(
        name,
        bad_input,
        PRETRAIN,
        ("--ds_config", "{ds.json}", *GOOD_DATA, *SMALL_MODEL, "--seq-len", "32"),
        expect,
        {"ds.json": ds_json(**changes)},
    )


def no_optimizer_json(stage: int) -> Callable[[Path, Path], None]:
    """ds_configs/zeroN.json without its optimizer section (what --optimizer muon or lion fills)."""

    def write(path: Path, _data: Path) -> None:
        config = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
        del config["optimizer"]
        path.write_text(json.dumps(config))

    return write


def pretrain_muon(name: str, bad_input: str, stage: int, expect: tuple[str, ...], *others: str) -> Case:
    """--optimizer muon with a ZeRO-`stage` JSON that leaves the optimizer to it, and `others`."""
    args = ("--ds_config", "{ds.json}", *GOOD_DATA, *SMALL_MODEL, "--seq-len", "32", "--optimizer", "muon", *others)
    return Case(name, bad_input, PRETRAIN, args, expect, {"ds.json": no_optimizer_json(stage)})


def pretrain_flag(flag: str, value: str, expect: tuple[str, ...], *others: str) -> Case:
    """`flag value` (with `others`, the flags it contradicts) on an otherwise good pretraining command."""
    return Case(
        f"pretrain{flag}-{value}",
        f"`{flag} {value}`" + (f" with `{' '.join(others)}`" if others else ""),
        PRETRAIN,
        (*ZERO2, *GOOD_DATA, *SMALL_MODEL, flag, value, *others),
        expect,
    )


def jsonl_line(text: str) -> Callable[[Path, Path], None]:
    return lambda path, _data: path.write_text('{"text": "a good document"}\n' + text + "\n")


def damaged_parquet(path: Path, _data: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(3000)]}), path, row_group_size=500)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):  # a page in the middle: the footer still reads
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def dataset_with_id(token_id: int) -> Callable[[Path, Path], None]:
    """A copy of the test dataset with one token id of train.bin replaced (the header is unchanged)."""

    def write(path: Path, data: Path) -> None:
        from dsllm.data.format import TokenFile

        shutil.copytree(data, path)
        (path / "train.max_token_id.json").unlink(missing_ok=True)
        tokens = np.memmap(path / "train.bin", dtype=TokenFile(path / "train").header.dtype, mode="r+")
        tokens[5] = token_id
        tokens.flush()

    return write


def model_folder(tokenizer_texts: list[str] | None = None, damaged: bool = False, weights_of=None, **fields):
    """A writer of a small trained-model folder (random weights) for --init, tokenized as the test dataset, or
    with a tokenizer trained on `tokenizer_texts`; `damaged`: its weights file cut in half; `weights_of`: the
    fields of another model, whose weights the folder holds."""

    def write(path: Path, data: Path) -> None:
        from dsllm.model import GPT
        from dsllm.model_config import ModelConfig
        from dsllm.model_dir import WEIGHTS_FILE, save_model_dir
        from dsllm.tokenizer import save_tokenizer, train_tokenizer

        shape = dict(vocab_size=320, max_seq_len=64, n_layers=1, d_model=32, n_heads=2, mlp_multiple_of=32)
        save_model_dir(GPT(ModelConfig(**{**shape, **fields})), path, data / "tokenizer.json")
        if tokenizer_texts:
            save_tokenizer(train_tokenizer(tokenizer_texts, vocab_size=280, show_progress=False), path)
        if weights_of:
            other = GPT(ModelConfig(**{**shape, **fields, **weights_of}))
            save_model_dir(other, path.with_name(path.name + "-other"))
            (path.with_name(path.name + "-other") / WEIGHTS_FILE).replace(path / WEIGHTS_FILE)
        if damaged:
            weights = (path / WEIGHTS_FILE).read_bytes()
            (path / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])

    return write


def dataset_of_another_tokenizer(path: Path, data: Path) -> None:
    """A small prepared dataset made with a tokenizer other than the test dataset's."""
    from conftest import make_documents, prepare_documents

    from dsllm.tokenizer import save_tokenizer, train_tokenizer

    texts = [f"other words {i} " * 8 for i in range(60)]
    save_tokenizer(train_tokenizer(texts, vocab_size=280, show_progress=False), path.with_name("other-tokenizer"))
    prepare_documents(make_documents(60, seed=9), path.with_name("other-tokenizer"), path)


def shards(*tokenizers: str | None) -> Callable[[Path, Path], None]:
    """A writer of a folder of K = len(tokenizers) shards of one corpus: shard i prepared with the test
    dataset's tokenizer ("data"), another one ("other"), or not at all (None)."""

    def write(path: Path, data: Path) -> None:
        from conftest import make_documents, write_jsonl

        from dsllm.data.prepare import PrepareConfig, prepare
        from dsllm.tokenizer import save_tokenizer, train_tokenizer

        corpus = write_jsonl(path.with_name(path.name + ".jsonl"), make_documents(60, seed=5))
        other = path.with_name(path.name + "-tokenizer")
        if "other" in tokenizers:
            texts = [f"other words {i} " * 8 for i in range(60)]
            save_tokenizer(train_tokenizer(texts, vocab_size=280, show_progress=False), other)
        for index, tokenizer in enumerate(tokenizers):
            if tokenizer is not None:
                folder = data if tokenizer == "data" else other
                prepare(
                    PrepareConfig(
                        [str(corpus)],
                        str(folder),
                        str(path),
                        0.2,
                        workers=1,
                        progress=False,
                        num_shards=len(tokenizers),
                        shard_index=index,
                    )
                )

    return write


def pretrain_mixture(name: str, bad_input: str, mixture: str, expect: tuple[str, ...], **files) -> Case:
    """`--data MIXTURE` ({data}: the test dataset) on an otherwise good pretraining command."""
    args = ("--ds_config", str(ROOT / "ds_configs" / "zero2.json"), "--data", mixture, "--out", "{tmp}/out")
    return Case(name, bad_input, PRETRAIN, (*args, *SMALL_MODEL, "--seq-len", "32"), expect, files)


def pretrain_init(name: str, bad_input: str, args: tuple[str, ...], expect: tuple[str, ...], **folder) -> Case:
    """`launch/pretrain.py --init FOLDER` (a model_folder(**folder)) with `args` added."""
    return Case(
        name,
        bad_input,
        PRETRAIN,
        (*ZERO2, *GOOD_DATA, "--init", "{init}", "--seq-len", "32", *args),
        expect,
        {"init": model_folder(**folder)},
    )


def phases_file(phases) -> Callable[[Path, Path], None]:
    """A --schedule file of these phases (JSON)."""
    return lambda path, _data: path.write_text(json.dumps(phases))


WSD_PHASES = [  # a --schedule wsd run of 300 steps, as its config.json records it
    {"start": 0, "steps": 15, "shape": "linear", "from": 0.0, "to": 1.0},
    {"start": 15, "steps": 225, "shape": "constant", "from": 1.0, "to": 1.0},
    {"start": 240, "steps": 60, "shape": "1-sqrt", "from": 1.0, "to": 0.1},
]


def checkpointed_run(step: int, phases=WSD_PHASES, model: dict | None = None, **run) -> Callable[[Path, Path], None]:
    """A run folder with config.json (these schedule phases, `run` as its resolved run) and a checkpoint marker at
    `step` of the test dataset (of `model`, default: another than SMALL_MODEL's); no DeepSpeed files (pre-flight
    reads the marker and config.json only)."""

    def write(path: Path, data: Path) -> None:
        from dsllm.checkpoint.store import COMPLETE_MARKER, tag_for
        from dsllm.data.format import TokenFile

        checkpoint = path / "checkpoints" / tag_for(step)
        checkpoint.mkdir(parents=True)
        marker = dict(step=step, consumed_samples=step * 8, world_size=1, zero_stage=2, precision="fp32")
        marker.update(model=model or {"n_layers": 1}, train_fingerprint=TokenFile(data / "train").fingerprint)
        marker.update(branch=None, previous=None, val_loss=None, files={})
        (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))
        config = {"train": {"lr": 1e-3}, "run": run, "schedule": {"phases": phases}}
        (path / "config.json").write_text(json.dumps(config))

    return write


def pretrain_schedule(name: str, bad_input: str, args: tuple[str, ...], expect: tuple[str, ...], **files) -> Case:
    """A good pretraining command with schedule options `args` ({NAME}: a file of `files`)."""
    return Case(name, bad_input, PRETRAIN, (*ZERO2, *GOOD_DATA, *SMALL_MODEL, "--seq-len", "32", *args), expect, files)


TOKENIZER_ARGS = ("--vocab-size", "300", "--output", "{tmp}/tok")
PREPARE_ARGS = ("--tokenizer", "{tokenizer}", "--output", "{tmp}/prepared", "--workers", "1")
CASES = [
    # -- the DeepSpeed JSON: DeepSpeed's own models, then our checks of meaning -----------------------------
    pretrain_ds(
        "zero-unknown-key",
        "unknown key inside `zero_optimization`",
        ("zero_optimization.stagee", 'did you mean "stage"'),
        zero_optimization__stagee=2,
    ),
    pretrain_ds(
        "zero-offload-device",
        '`offload_optimizer.device: "gpu"`',
        ("zero_optimization.offload_optimizer.device", "'none', 'cpu' or 'nvme'"),
        zero_optimization__offload_optimizer={"device": "gpu"},
    ),
    pretrain_ds("bf16-true", '`"bf16": true`', ("bf16 is true, but must be an object", '{"enabled": true}'), bf16=True),
    pretrain_ds(
        "optimizer-null", '`"optimizer": null`', ("optimizer is null", "remove it for dsllm's AdamW"), optimizer=None
    ),
    pretrain_ds(
        "betas-one",
        "`betas: [0.9]`",
        ("optimizer.params.betas = [0.9]", "two numbers in [0, 1)"),
        optimizer__params__betas=[0.9],
    ),
    pretrain_ds(
        "optimizer-param-typo",
        "misspelled optimizer param `weight_decy`",
        ("optimizer.params.weight_decy", 'did you mean "weight_decay"'),
        optimizer__params__weight_decy=0.1,
    ),
    pretrain_ds(
        "optimizer-type", '`optimizer.type: "FusedAdam"`', ('did you mean "AdamW"',), optimizer__type="FusedAdam"
    ),
    pretrain_ds(
        "optimizer-lr-nan",
        "`optimizer.params.lr: NaN`",
        ("optimizer.params.lr = NaN", "finite"),
        optimizer__params__lr=float("nan"),
    ),
    pretrain_ds(
        "optimizer-eps-zero",
        "`optimizer.params.eps: 0`",
        ("optimizer.params.eps = 0", "above 0"),
        optimizer__params__eps=0,
    ),
    pretrain_ds(
        "cosine-warmup-zero",
        "WarmupCosineLR with `warmup_num_steps: 0`",
        ("scheduler.params.warmup_num_steps = 0", "1 or more"),
        scheduler__params__warmup_num_steps=0,
    ),
    pretrain_ds(
        "cos-min-ratio",
        "`cos_min_ratio: 5`",
        ("scheduler.params.cos_min_ratio = 5", "[0, 1]"),
        scheduler__params__cos_min_ratio=5,
    ),
    pretrain_ds(
        "scheduler-type",
        '`scheduler.type: "WarmupCosine"`',
        ('did you mean "WarmupCosineLR"',),
        scheduler__type="WarmupCosine",
    ),
    pretrain_ds(
        "scheduler-param",
        "`warmup_max_lr` for WarmupCosineLR",
        ("scheduler.params.warmup_max_lr", "not a parameter of WarmupCosineLR"),
        scheduler__params__warmup_max_lr=0.1,
    ),
    pretrain_ds(
        "top-level-typo",
        "misspelled top-level key `gradient_clippin`",
        ('unknown top-level key "gradient_clippin"', 'did you mean "gradient_clipping"'),
        gradient_clippin=1.0,
    ),
    pretrain_ds(
        "checkpointing-typo",
        "misspelled `activation_checkpointing.partition_activation`",
        (
            "activation_checkpointing.partition_activation: not a DeepSpeed field",
            'did you mean "partition_activations"',
        ),
        activation_checkpointing={"partition_activation": True},
    ),
    pretrain_ds("grad-clip-negative", "`gradient_clipping: -1`", ("gradient_clipping = -1",), gradient_clipping=-1),
    pretrain_ds("fp16-loss-scale", "`fp16.loss_scale: -1`", ("fp16.loss_scale", "must be >= 0"), fp16__loss_scale=-1),
    pretrain_ds(
        "tensorboard-missing",
        "tensorboard monitor enabled, package missing",
        ("tensorboard.enabled is true", 'pip install -e ".[tensorboard]"'),
        tensorboard__enabled=True,
    ),
    pretrain_ds(
        "removed-key",
        "`amp` (removed from DeepSpeed)",
        ("amp: NVIDIA Apex AMP integration has been removed",),
        amp={"enabled": True},
    ),
    # -- the command line -------------------------------------------------------------------------------------
    pretrain_flag("--lr", "nan", ("--lr", "not a finite number")),
    pretrain_flag("--grad-clip", "inf", ("--grad-clip", "not a finite number")),
    pretrain_flag("--peak-tflops", "nan", ("--peak-tflops", "not a finite number")),
    pretrain_flag("--collective-timeout", "-1", ("--collective-timeout -1.0", "above 0")),
    pretrain_flag("--min-lr-ratio", "5", ("--min-lr-ratio 5.0", "[0, 1]")),
    pretrain_flag("--warmup-steps", "-3", ("--warmup-steps -3", "0 or more")),
    pretrain_flag("--beta2", "1", ("--beta2 1.0", "[0, 1)")),
    pretrain_flag("--weight-decay", "-0.1", ("--weight-decay -0.1", "0 or more")),
    pretrain_flag("--expert-parallel", "2", ("--expert-parallel 2", "no experts to split", "--model.moe_experts")),
    pretrain_flag("--model.moe_experts", "1", ("model.moe_experts = 1", "at least 2 experts")),
    pretrain_flag("--max-cpu-seconds", "0", ("--max-cpu-seconds 0.0", "above 0")),
    pretrain_flag(
        "--model.z_loss",
        "1e-4",
        ("--tensor-parallel 2 with --model.z_loss 0.0001", "drop one of them"),
        "--tensor-parallel",
        "2",
    ),
    pretrain_flag("--model.z_loss", "-1", ("model.z_loss = -1.0", "0 (off) or more")),
    pretrain_flag("--model.logit_softcap", "-30", ("model.logit_softcap = -30.0", "above 0")),
    pretrain_flag("--model.mlp", "relu", ("model.mlp = 'relu'", "gelu, gelu_tanh, swiglu, relu2")),
    pretrain_flag("--model.value_embeddings", "2", ("model.value_embeddings = 2", "0 (off) to n_layers // 2 = 1")),
    pretrain_flag(
        "--model.value_embeddings",
        "1",
        ("--tensor-parallel 2 with --model.value_embeddings 1", "drop one of them"),
        "--tensor-parallel",
        "2",
    ),
    pretrain_flag(
        "--model.unet_skips",
        "true",
        ("--pipeline-parallel 2 with --model.unet_skips True", "drop one of them"),
        "--pipeline-parallel",
        "2",
    ),
    pretrain_flag("--head-lr-scale", "2", ("--head-lr-scale 2.0 with a tied LM head", "--model.tie_embeddings false")),
    pretrain_flag("--embedding-lr-scale", "0", ("--embedding-lr-scale 0.0", "above 0")),
    pretrain_flag("--embedding-weight-decay", "-0.1", ("--embedding-weight-decay -0.1", "0 or more")),
    Case(
        "lr-scale-one-lr-scheduler",
        "`--embedding-lr-scale 10` with a JSON scheduler that sets one lr (WarmupLR)",
        PRETRAIN,
        ("--ds_config", "{ds.json}", *GOOD_DATA, *SMALL_MODEL, "--seq-len", "32", "--embedding-lr-scale", "10"),
        ("--embedding-lr-scale 10.0 with", "scheduler WarmupLR, which sets one lr for every parameter group"),
        {"ds.json": ds_json(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}})},
    ),
    pretrain_flag("--optimizer", "sgd", ("--optimizer sgd", "use adamw, muon or lion")),
    pretrain_flag("--muon-momentum", "1", ("--muon-momentum 1.0", "[0, 1)")),
    Case(
        "optimizer-muon-json-adamw",
        "`--optimizer muon` with a JSON whose AdamW has an lr of its own",
        PRETRAIN,
        ("--ds_config", "{ds.json}", *GOOD_DATA, *SMALL_MODEL, "--seq-len", "32", "--optimizer", "muon"),
        ("--optimizer muon", "names its own optimizer (AdamW)", 'remove its "optimizer" section'),
        {"ds.json": ds_json(optimizer={"type": "AdamW", "params": {"lr": 3e-4}})},
    ),
    pretrain_muon("optimizer-muon-zero3", "`--optimizer muon` with ZeRO-3", 3, ("--optimizer muon with ZeRO-3",)),
    pretrain_muon(
        "optimizer-muon-zero2-clip",
        "`--optimizer muon` on ZeRO-2 with gradient clipping (the default 1.0)",
        2,
        ("--optimizer muon with ZeRO-2", "clip the norm of Muon's orthogonalised update", "pass --grad-clip 0"),
    ),
    pretrain_muon(
        "optimizer-muon-moe",
        "`--optimizer muon` with a Mixture-of-Experts model",
        2,
        ("--optimizer muon with a Mixture-of-Experts model", "--optimizer adamw"),
        "--model.moe_experts",
        "2",
    ),
    pretrain_flag("--seq-len-warmup", "300", ("--seq-len-warmup 300 is not below --max-steps 300",)),
    pretrain_flag("--seq-len-start", "16", ("--seq-len-start 16 without --seq-len-warmup", "pass --seq-len-warmup")),
    pretrain_flag(
        "--seq-len-start", "24", ("--seq-len-start 24: not --seq-len 64 halved", "32, 16, 8"), "--seq-len-warmup", "10"
    ),
    pretrain_flag(
        "--seq-len-warmup",
        "10",
        ("--seq-len 12 has no half of 8 tokens", "--seq-len-start (one of 6, 3)"),
        "--seq-len",
        "12",
    ),
    pretrain_flag("--batch-size-warmup", "300", ("--batch-size-warmup 300 is not below --max-steps 300",)),
    pretrain_flag(
        "--batch-size-start", "16", ("--batch-size-start 16 without --batch-size-warmup", "pass --batch-size-warmup")
    ),
    pretrain_flag(
        "--batch-size-warmup",
        "10",
        ("--batch-size-warmup 10: the run accumulates 1 micro batch per step", "raise --grad-accum and lower"),
        "--grad-accum",
        "1",
    ),
    pretrain_flag(
        "--batch-size-start",
        "12",
        ("--batch-size-start 12: not a multiple of 8 samples (--micro-batch-size 8 x 1", "use one of 8, 16, 24"),
        *("--batch-size-warmup", "10", "--grad-accum", "4", "--micro-batch-size", "8"),
    ),
    Case(
        "pretrain--batch-size-warmup-mixture-schedule",
        "`--batch-size-warmup 10` with a mixture whose weights change at a step",
        PRETRAIN,
        (*ZERO2, "--data", "{mixture.json}", "--out", "{tmp}/out", *SMALL_MODEL, "--seq-len", "32")
        + ("--batch-size-warmup", "10", "--grad-accum", "2"),
        ("--batch-size-warmup with the schedule of --data", "not supported yet", "drop one of them"),
        {
            "mixture.json": lambda path, data: path.write_text(
                json.dumps(
                    {
                        "sources": {"web": {"path": str(data), "weight": 1}, "code": {"path": str(data), "weight": 1}},
                        "schedule": [{"at_step": 20, "weights": {"web": 1, "code": 3}}],
                    }
                )
            )
        },
    ),
    # -- learning-rate schedules (dsllm.schedule) and cooldown branches (--decay-from, dsllm.cooldown) ----------
    pretrain_flag("--schedule", "linear", ("--schedule linear", "use cosine, wsd or a .json/.yaml file of phases")),
    pretrain_flag("--decay-fraction", "1.5", ("--decay-fraction 1.5", "in (0, 1)")),
    pretrain_flag("--decay-shape", "square", ("--decay-shape square", "use linear, cosine, 1-sqrt")),
    pretrain_flag("--decay-steps", "50", ("--decay-steps 50: only --schedule wsd", "drop the option or use wsd")),
    pretrain_flag(
        "--schedule",
        "wsd",
        ("--schedule wsd: the decay of 297 steps would start at step 3, inside the warmup of 15 steps",),
        "--decay-fraction",
        "0.99",
    ),
    Case(
        "pretrain--decay-in-budget-no-budget",
        "`--decay-in-budget` without `--max-cpu-seconds` or `--max-time`",
        PRETRAIN,
        (*ZERO2, *GOOD_DATA, *SMALL_MODEL, "--schedule", "wsd", "--decay-in-budget"),
        ("--decay-in-budget without a budget", "pass --max-cpu-seconds or --max-time"),
    ),
    Case(
        "pretrain--decay-in-budget-cosine",
        "`--decay-in-budget` with the cosine schedule",
        PRETRAIN,
        (*ZERO2, *GOOD_DATA, *SMALL_MODEL, "--max-time", "1h", "--decay-in-budget"),
        ("--decay-in-budget with --schedule cosine: only wsd has a decay", "pass --schedule wsd"),
    ),
    Case(
        "pretrain--decay-in-budget-decay-from",
        "`--decay-in-budget` on a `--decay-from` branch",
        PRETRAIN,
        (*ZERO2, *GOOD_DATA, *SMALL_MODEL, "--schedule", "wsd", "--max-time", "1h", "--decay-in-budget")
        + ("--decay-from", "{tmp}/stable/checkpoints/step00000100"),
        ("--decay-in-budget with --decay-from", "the branch is the cooldown, over --decay-steps; drop one"),
    ),
    pretrain_schedule(
        "schedule-unknown-shape",
        "a phases file with an unknown shape",
        ("--schedule", "{phases.json}"),
        ("phases.json: phase 1: unknown shape 'cosin'", "use one of constant, linear, cosine, 1-sqrt"),
        **{"phases.json": phases_file([{"steps": 300, "shape": "cosin", "from": 1, "to": 0.1}])},
    ),
    pretrain_schedule(
        "schedule-negative-steps",
        "a phases file with negative steps",
        ("--schedule", "{phases.json}"),
        ("phases.json: phase 1: steps -5: negative",),
        **{
            "phases.json": phases_file(
                [{"steps": -5, "shape": "linear", "to": 1}, {"steps": "rest", "shape": "constant", "from": 1}]
            )
        },
    ),
    pretrain_schedule(
        "schedule-not-covering",
        "phases that do not cover `--max-steps`",
        ("--schedule", "{phases.yaml}"),
        ("the phases cover 110 steps, --max-steps is 300", '"steps": "rest"'),
        **{
            "phases.yaml": lambda path, _: path.write_text(
                "- {steps: 10, shape: linear, to: 1}\n- {steps: 100, shape: constant}\n"
            )
        },
    ),
    pretrain_schedule(
        "schedule-negative-factor",
        "a phase's factor below 0",
        ("--schedule", "{phases.json}"),
        ("phase 1: to -0.5: a factor of --lr is a number, 0 or more",),
        **{"phases.json": phases_file([{"steps": "rest", "shape": "linear", "from": 1, "to": -0.5}])},
    ),
    pretrain_schedule(
        "decay-from-not-a-checkpoint",
        "`--decay-from` a folder that is not a checkpoint",
        ("--decay-from", "{tmp}"),
        (
            "--decay-from",
            "not a checkpoint (a checkpoints/stepNNNNNNNN folder",
            "pass one of a --schedule wsd run's checkpoints",
        ),
    ),
    pretrain_schedule(
        "decay-from-cosine-run",
        "`--decay-from` a checkpoint of a cosine run",
        ("--decay-from", "{src}/checkpoints/step00000100"),
        ("saved at step 100, in a cosine phase (steps 15-300)", "not a stable (constant) one"),
        src=checkpointed_run(
            100,
            [
                {"start": 0, "steps": 15, "shape": "linear", "from": 0.0, "to": 1.0},
                {"start": 15, "steps": 285, "shape": "cosine", "from": 1.0, "to": 0.1},
            ],
        ),
    ),
    pretrain_schedule(
        "decay-from-after-decay-began",
        "`--decay-from` a checkpoint after its run's decay began",
        ("--decay-from", "{src}/checkpoints/step00000260"),
        ("saved at step 260, in a 1-sqrt phase", "its run's decay started at step 240, before it"),
        src=checkpointed_run(260),
    ),
    pretrain_schedule(
        "decay-from-with-resume",
        "`--decay-from` with `--resume` of another checkpoint",
        ("--decay-from", "{src}/checkpoints/step00000100", "--resume", "none"),
        ("--decay-from", "with --resume none", "drop --resume"),
        src=checkpointed_run(100),
    ),
    pretrain_schedule(
        "decay-from-other-batch",
        "`--decay-from` with another global batch",
        ("--decay-from", "{src}/checkpoints/step00000100"),
        ("its run trained with global_batch_size 999", "pass --global-batch-size 999"),
        src=checkpointed_run(100, global_batch_size=999),
    ),
    pretrain_schedule(
        "decay-from-into-its-run",
        "`--decay-from` with `--out` inside the checkpoint's run",
        ("--decay-from", "{src}/checkpoints/step00000100", "--out", "{src}/cooldown"),
        ("--out", "src/cooldown: inside", "the run --decay-from", "branches off; pass a new --out"),
        src=checkpointed_run(100),
    ),
    pretrain_schedule(
        "decay-from-other-model",
        "`--decay-from` a checkpoint of another model",
        ("--decay-from", "{src}/checkpoints/step00000100"),
        ("step00000100: saved from a model that differs in n_layers", "resume with the same --model options"),
        src=checkpointed_run(100),
    ),
    # -- the dataset --------------------------------------------------------------------------------------------
    Case(
        "token-id-past-vocab",
        "dataset with a token id past the tokenizer's vocabulary",
        PRETRAIN,
        (*ZERO2, "--data", "{bad_data}", "--out", "{tmp}/out", *SMALL_MODEL, "--seq-len", "32"),
        ("train.bin: token id 310", "vocabulary size 300", "prepare.py"),
        {"bad_data": dataset_with_id(310)},
    ),
    # -- weighted mixtures (--data NAME=DIR:WEIGHT,...) -----------------------------------------------------------
    pretrain_mixture(
        "mixture-weight-zero",
        "mixture source with weight 0 (or below)",
        "web={data}:0.7,code={data}:0",
        ("source code has weight 0", "a source's weight must be above 0"),
    ),
    pretrain_mixture(
        "mixture-missing-source",
        "mixture source folder that does not exist",
        "web={data}:0.7,books={tmp}/books:0.3",
        ("--data: source books:", "books: no such folder", "prepare it"),
    ),
    pretrain_mixture(
        "mixture-other-tokenizer",
        "mixture sources made with different tokenizers",
        "web={data}:0.7,other={other}:0.3",
        ("sources other and web were made with different tokenizers", "prepare every source with one tokenizer"),
        other=dataset_of_another_tokenizer,
    ),
    # -- starting from a trained model (--init) -----------------------------------------------------------------
    pretrain_init(
        "init-shape-override",
        "`--init` with an override that changes a weight's shape",
        ("--model.d_model", "64"),
        ("--model.d_model 64: changes the shape of the weights of --init", "d_model = 32 there", "drop it"),
        positions="rope",
    ),
    pretrain_init(
        "init-other-preset",
        "`--init` with another `--model` preset",
        ("--model", "gpt2-124m"),
        ("--model gpt2-124m: not the model of --init", "n_layers = 12, there 1", "drop --model"),
    ),
    pretrain_init(
        "init-learned-max-seq-len",
        "`--init` of a learned-position model with a longer `--model.max_seq_len`",
        ("--model.max_seq_len", "128"),
        ("--model.max_seq_len 128:", "has learned positions, a table of 64 rows", "only a RoPE model's context"),
    ),
    pretrain_init(
        "init-other-tokenizer",
        "`--init` of a model tokenized otherwise than `--data`",
        (),
        ("its tokenizer", "is not the one --data", "was made with", "prepare.py --tokenizer"),
        tokenizer_texts=[f"other words {i} " * 8 for i in range(300)],
    ),
    pretrain_init(
        "init-damaged-weights",
        "`--init` folder with a damaged `model.safetensors`",
        (),
        ("model.safetensors: cannot load these weights", "the files are damaged"),
        damaged=True,
    ),
    pretrain_init(
        "init-foreign-weights",
        "`--init` folder whose `model.safetensors` is another model's",
        (),
        ("weights do not fit", "config.json", "unexpected ['blocks.1.", "they come from another model"),
        weights_of={"n_layers": 2},
    ),
    pretrain_init(
        "init-out-is-init",
        "`--out` the `--init` folder",
        ("--out", "{init}"),
        ("contains", "which --init reads", "choose another --out"),
    ),
    # -- corpus inputs ------------------------------------------------------------------------------------------
    Case(
        "jsonl-deep-nesting",
        "JSONL line with 100,000 nested `[`",
        "data_pipeline/prepare.py",
        ("--input", "{deep.jsonl}", *PREPARE_ARGS),
        ("deep.jsonl:2:", "nested too deeply"),
        {"deep.jsonl": jsonl_line('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}")},
    ),
    Case(
        "jsonl-long-integer",
        "JSONL line with a 5,000-digit integer",
        "data_pipeline/prepare.py",
        ("--input", "{big.jsonl}", *PREPARE_ARGS),
        ("big.jsonl:2:", "4300 digits"),
        {"big.jsonl": jsonl_line('{"text": "x", "n": ' + "9" * 5000 + "}")},
    ),
    Case(
        "parquet-corrupt-prepare",
        "Parquet file with a damaged page",
        "data_pipeline/prepare.py",
        ("--input", "{bad.parquet}", *PREPARE_ARGS),
        ("bad.parquet: damaged Parquet data after row",),
        {"bad.parquet": damaged_parquet},
        subprocess=True,
    ),
    Case(
        "parquet-corrupt-tokenizer",
        "Parquet file with a damaged page",
        "tokenizer/train_tokenizer.py",
        ("--input", "{bad.parquet}", *TOKENIZER_ARGS),
        ("bad.parquet: damaged Parquet data after row",),
        {"bad.parquet": damaged_parquet},
        subprocess=True,
    ),
    Case(
        "hf-stream-malformed",
        "`--input hf:corpus` (no split)",
        "data_pipeline/prepare.py",
        ("--input", "hf:corpus", *PREPARE_ARGS),
        ("hf:corpus: not a dataset spelling datasets can stream; use hf:NAME[:CONFIG]:SPLIT",),
    ),
    Case(
        "hf-stream-missing",
        "`--input hf:FOLDER:train` with no such folder (or a split, config or Hub name that does not load)",
        "data_pipeline/prepare.py",
        ("--input", "hf:{tmp}/missing:train", *PREPARE_ARGS),
        ("missing:train: datasets cannot stream it (Couldn't find any data file at", "check the NAME, CONFIG"),
    ),
    *(
        Case(
            f"sample-bytes-{value}",
            f"`--sample-bytes {value}`",
            "tokenizer/train_tokenizer.py",
            ("--input", "{c.jsonl}", *TOKENIZER_ARGS, "--sample-bytes", value),
            (f"--sample-bytes {value}: give a positive number of bytes",),
            {"c.jsonl": jsonl_line('{"text": "another good document"}')},
        )
        for value in ("0", "-5")
    ),
    Case(
        "sample-bytes-below-every-document",
        "`--sample-bytes` smaller than every document",
        "tokenizer/train_tokenizer.py",
        ("--input", "{c.jsonl}", *TOKENIZER_ARGS, "--sample-bytes", "10"),
        ("--sample-bytes 10 is smaller than every document left after cleaning", "give a larger"),
        {"c.jsonl": jsonl_line('{"text": "another good document, longer than ten bytes"}')},
    ),
    *(
        Case(
            f"near-dedup-threshold-{value}",
            f"`--near-dedup-threshold {value}`",
            "data_pipeline/prepare.py",
            ("--input", "{c.jsonl}", *PREPARE_ARGS, "--near-dedup-threshold", value),
            (f"--near-dedup-threshold {value} is outside (0, 1]",),
            {"c.jsonl": jsonl_line('{"text": "another good document"}')},
        )
        for value in ("0", "1.5", "nan")
    ),
    # -- sharded datasets ---------------------------------------------------------------------------------------
    Case(
        "shard-index-out-of-range",
        "`--shard-index 3` with `--num-shards 3`",
        "data_pipeline/prepare.py",
        ("--input", "{c.jsonl}", *PREPARE_ARGS, "--num-shards", "3", "--shard-index", "3"),
        ("--shard-index 3 is outside 0..2 (--num-shards 3)",),
        {"c.jsonl": jsonl_line('{"text": "another good document"}')},
    ),
    Case(
        "shard-index-missing",
        "`--num-shards 3` without `--shard-index`",
        "data_pipeline/prepare.py",
        ("--input", "{c.jsonl}", *PREPARE_ARGS, "--num-shards", "3"),
        ("--num-shards 3 needs --shard-index I (0..2)",),
        {"c.jsonl": jsonl_line('{"text": "another good document"}')},
    ),
    Case(
        "merge-shard-missing",
        "a shard missing (shards 0 and 2 of 3 prepared)",
        "data_pipeline/merge_shards.py",
        ("--output", "{shards}"),
        ("shard 1 of 3 (shard-1-of-3) is missing or incomplete", "--shard-index 1", "then merge again"),
        {"shards": shards("data", None, "data")},
    ),
    Case(
        "merge-shard-other-tokenizer",
        "a shard made with another tokenizer",
        "data_pipeline/merge_shards.py",
        ("--output", "{shards}"),
        ("shard 1 was made with another tokenizer", "prepare every shard with one --tokenizer"),
        {"shards": shards("data", "other")},
    ),
    # -- generate and plan --------------------------------------------------------------------------------------
    Case(
        "temperature-huge",
        "`--temperature 1e300`",
        "python -m dsllm generate",
        ("--checkpoint", "{tmp}", "--temperature", "1e300"),
        ("--temperature", "must be 0 (greedy) or more, at most 100"),
    ),
    Case(
        "temperature-nan",
        "`--temperature nan`",
        "python -m dsllm generate",
        ("--checkpoint", "{tmp}", "--temperature", "nan"),
        ("--temperature", "not a finite number"),
    ),
    Case(
        "top-p-2",
        "`--top-p 2`",
        "python -m dsllm generate",
        ("--checkpoint", "{tmp}", "--top-p", "2"),
        ("--top-p", "at most 1"),
    ),
    Case(
        "device-meta",
        "`--device meta`",
        "python -m dsllm generate",
        ("--checkpoint", "{tmp}", "--device", "meta"),
        ("--device", "use auto, cpu, cuda or cuda:N"),
    ),
    Case(
        "evaluate-whole-split-and-max-windows",
        "`--whole-split` with `--max-windows`",
        "python -m dsllm evaluate",
        ("--checkpoint", "{tmp}", "--data", "{data}", "--whole-split", "--max-windows", "4"),
        ("--whole-split with --max-windows 4", "pass one of them"),
    ),
    Case(
        "plan-1e400",
        "`--model 1e400`",
        "python -m dsllm plan",
        ("--model", "1e400", "--gpus", "8xA100"),
        ("--model '1e400'", "at most 1e15"),
        subprocess=True,
    ),
]


def _fill(args: tuple[str, ...], values: dict[str, str]) -> list[str]:
    filled = []
    for arg in args:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        filled.append(arg)
    return filled


def run_case(case: Case, tmp: Path, data: Path, tokenizer: Path) -> tuple[int, str]:
    """(exit code, stderr) of the case's command."""
    values = {"tmp": str(tmp), "data": str(data), "tokenizer": str(tokenizer)}
    for name, write in case.files.items():
        write(tmp / name, data)
        values[name] = str(tmp / name)
    argv = _fill(case.args, values)
    if case.subprocess:
        head = case.command.split()
        cmd = [sys.executable, *head[1:]] if head[0] == "python" else [sys.executable, str(ROOT / case.command)]
        proc = subprocess.run([*cmd, *argv], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
        return proc.returncode, proc.stderr
    from dsllm.errors import run_cli

    module, function = COMMAND_MAINS[case.command]
    main = getattr(importlib.import_module(module), function)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv) if case.command == PRETRAIN else run_cli(main, argv)  # the trainer prints its own
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, stderr.getvalue()


def record(case: Case, line: str, tmp: Path, data: Path) -> None:
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    answer = line.replace(str(tmp) + "/", "").replace(str(tmp), ".").replace(str(data), "DATA")
    answer = answer.replace(str(ROOT) + "/", "")
    command = f"python {case.command}" if case.command.endswith(".py") else case.command
    with open(path, "a") as f:
        f.write(json.dumps({"name": case.name, "input": case.bad_input, "command": command, "answer": answer}) + "\n")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, dataset_dir, tokenizer_dir):
    if case.name == "tensorboard-missing" and importlib.util.find_spec("tensorboard"):
        pytest.skip("tensorboard is installed here")
    code, stderr = run_case(case, tmp_path, dataset_dir, tokenizer_dir)
    line = assert_user_error(subprocess.CompletedProcess([], code, "", stderr), *case.expect)
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists() and not (tmp_path / "tok").exists()
    record(case, line, tmp_path, dataset_dir)


def test_a_folder_symlinked_into_itself_is_read_once(tmp_path):
    from dsllm.data.sources import CorpusReader

    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "first"}\n')
    (tmp_path / "corpus" / "sub" / "b.jsonl").write_text('{"text": "second"}\n')
    (tmp_path / "corpus" / "sub" / "loop").symlink_to(tmp_path / "corpus")  # was read 41 times, to ELOOP
    (tmp_path / "corpus" / "sub" / "same.jsonl").symlink_to(tmp_path / "corpus" / "a.jsonl")
    reader = CorpusReader([tmp_path / "corpus", tmp_path / "corpus" / "a.jsonl"])
    assert list(reader) == ["first", "second"] and reader.stats.files == 2


def test_max_token_id_is_cached_by_fingerprint(tmp_path, dataset_dir):
    from dsllm.data.format import TokenFile

    data = tmp_path / "data"
    dataset_with_id(299)(data, dataset_dir)
    train = TokenFile(data / "train")
    assert train.max_token_id() == 299 == int(np.asarray(train.tokens).max())
    cache = json.loads((data / "train.max_token_id.json").read_text())
    assert cache == {"fingerprint": train.fingerprint, "max_token_id": 299}
    (data / "train.max_token_id.json").write_text(json.dumps({"fingerprint": "another dataset", "max_token_id": 5}))
    assert TokenFile(data / "train").max_token_id() == 299  # a cache of other contents is recomputed, not trusted
    (data / "train.max_token_id.json").unlink()
    data.chmod(0o555)  # a read-only dataset folder: computed, not cached (as root the folder stays writable)
    try:
        assert TokenFile(data / "train").max_token_id() == 299
        assert (data / "train.max_token_id.json").exists() == os.access(data, os.W_OK)
        assert not list(data.glob("*.tmp"))
    finally:
        data.chmod(0o755)


def test_prompt_file_jsonl_faults_name_file_and_line(tmp_path):
    from dsllm.errors import UserError
    from dsllm.generate import read_prompts

    deep, big = tmp_path / "deep.jsonl", tmp_path / "big.jsonl"
    deep.write_text('"ok"\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    big.write_text('"ok"\n{"prompt": ' + "1" * 5000 + "}\n")
    for path, fragment in ((deep, "nested too deeply"), (big, "4300 digits")):
        with pytest.raises(UserError, match=f"{path.name}:2: .*{fragment}"):
            read_prompts([], [str(path)])
