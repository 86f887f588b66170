"""Pretraining: `dsllm pretrain` / `deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json [options]`.

`preflight` checks everything that can fail on the user's input (data, tokenizer, model, DeepSpeed JSON,
resume point) before any rank initialises the process group or builds the model, and resolves the run
into a `RunSpec`. `run` then trains on the shared engine (`dsllm.engine`) and loop (`dsllm.loop`), and
ends with the final weights as a model folder, the validation result and a sample.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.batch_warmup import batch_warmup
from dsllm.cli_args import add_config_arguments, add_launcher_argument, add_recipe_argument, parse_config
from dsllm.ds_config import load_ds_config, resolve_ds_config
from dsllm.ds_config_optimizer import check_optimizer_layout, check_resume_optimizer
from dsllm.errors import ArgumentParser, UserError
from dsllm.experts import check_experts
from dsllm.model_config import ConfigError, ModelConfig, resolve_model_config
from dsllm.run_spec import RunSpec, World
from dsllm.seq_len_warmup import seq_len_warmup
from dsllm.sequence_parallel import check_sequence_parallel
from dsllm.tensor_parallel import autotp_section, check_tensor_parallel
from dsllm.train_config import DEFAULT_MODEL, RunConfig, TrainConfig

# what changes a run's speed or placement: kept in config.json
RECORDED_ENV = (
    "NCCL_",
    "OMP_NUM_THREADS",
    "GLIBC_TUNABLES",
    "CUDA_VISIBLE_DEVICES",
    "DS_ACCELERATOR",
    "MASTER_",
    "WORLD_SIZE",
    "LOCAL_SIZE",
    "TORCH_NCCL_",
)
VOCAB_MULTIPLE = 64  # embedding rows padded so matmuls tile well; the extra ids are never produced


if TYPE_CHECKING:  # (imported where used: `dsllm pretrain --help` loads no torch)
    from dsllm.checkpoint.checkpointer import Checkpointer
    from dsllm.cooldown import BudgetDecay
    from dsllm.data.format import TokenFile
    from dsllm.data.mixture import Mixture
    from dsllm.model_dir import StoredWeights
    from dsllm.schedule import Schedule


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """A checked pretraining run: its options, the resolved spec, the data and the resume decision. With a mixture
    (`--data` of several sources), `data_dir`, `train` and `val` are its first source's (the tokenizer, the
    sample prompt), and `mixture` has them all."""

    config: TrainConfig
    spec: RunSpec
    data_dir: Path
    train: TokenFile
    val: TokenFile
    checkpointer: Checkpointer
    init_weights: StoredWeights | None = None  # --init's, checked, for a fresh start (dsllm.continued)
    mixture: Mixture | None = None
    schedule: Schedule | None = None  # the lr phases (--schedule's, or a --decay-from branch's); None: the JSON's
    budget: BudgetDecay | None = None  # --decay-in-budget: the phases in force, changed when the decay starts

    @property
    def max_steps(self) -> int:
        """The run's last step: --max-steps, or its budget's decay's end once decided."""
        return self.budget.max_steps if self.budget is not None else self.config.max_steps

    def schedule_record(self) -> dict | None:
        """config.json's "schedule": the lr phases (and a budget's decay's decision, once taken); None: the JSON's."""
        if self.budget is not None:
            return self.budget.record()
        return None if self.schedule is None else {"phases": self.schedule.to_list()}


def resolve_spec(config: RunConfig, model: ModelConfig, world: World) -> RunSpec:
    """The DeepSpeed JSON with "auto" filled for this hardware and world, as a RunSpec (pre-flight, no process
    group). Fine-tuning resolves its spec here too."""
    import torch

    on_gpu = torch.cuda.is_available()
    supports_bf16 = torch.cuda.is_bf16_supported() if on_gpu else True
    stages = getattr(config, "pipeline_parallel", 1)  # (fine-tuning has neither pipeline nor tensor layout)
    tensor = getattr(config, "tensor_parallel", 1)
    from dsllm.pipeline import check_pipeline

    check_pipeline(model, world.size, stages, getattr(config, "pipeline_partition", "blocks"), config.compile)
    raw = load_ds_config(config.ds_config)
    if "tensor_parallel" in raw:
        raise UserError(
            f'{config.ds_config}: has a "tensor_parallel" section; remove it and use --tensor-parallel N (dsllm '
            "gives DeepSpeed's AutoTP the layer specs of its GPT)"
        )
    if "sequence_parallel_size" in raw:
        raise UserError(
            f'{config.ds_config}: has "sequence_parallel_size"; remove it and use --sequence-parallel N (dsllm hands '
            "DeepSpeed its sequence groups)"
        )
    sequence = getattr(config, "sequence_parallel", 1)
    seq_len = config.seq_len or model.max_seq_len
    ds, batch, precision, stage = resolve_ds_config(
        raw,
        config,
        world.size // (stages * tensor * sequence),  # the data-parallel size: the batch arithmetic counts replicas
        config.ds_config,
        supports_bf16,
        on_gpu,
        hidden_size=model.d_model,
    )
    check_tensor_parallel(model, world.size, tensor, stages, config.compile, stage)
    from dsllm.optimizer import check_lr_groups

    check_lr_groups(config, model, ds, config.ds_config)
    check_sequence_parallel(
        model,
        world.size,
        sequence,
        seq_len,
        stages=stages,
        tensor=tensor,
        zero_stage=stage,
        document_mask=getattr(config, "document_mask", False),
        seq_len_warmup=getattr(config, "seq_len_warmup", 0),
        compile_=config.compile,
    )
    experts = getattr(config, "expert_parallel", 1)
    check_experts(model, stages, tensor, experts, world.size // (stages * tensor), stage, config.ds_config)
    moe = model.moe_experts > 0
    check_optimizer_layout(
        ds, config.ds_config, pipeline=stages, tensor=tensor, sequence=sequence, experts=experts, moe=moe
    )
    if stages > 1 and stage >= 2:
        raise UserError(
            f"--pipeline-parallel {stages} with {config.ds_config} (ZeRO-{stage}): ZeRO-2 and 3 partition the "
            "gradients, which DeepSpeed's pipeline engine accumulates whole across micro batches; use "
            "ds_configs/zero1.json (or zero0.json) with pipeline stages"
        )
    if stages > 1 and getattr(config, "document_mask", False):
        raise UserError(
            f"--document-mask with --pipeline-parallel {stages}: not supported yet (the stages pass each other the "
            "hidden states only, not the mask); drop one of them"
        )
    warmup = getattr(config, "seq_len_warmup", 0)
    if stages > 1 and warmup:
        raise UserError(
            f"--seq-len-warmup with --pipeline-parallel {stages}: not supported yet (DeepSpeed's pipeline engine "
            "passes activations of one fixed shape between the stages); drop one of them"
        )
    model.check_seq_len(seq_len)
    seq_len_warmup(warmup, getattr(config, "seq_len_start", None), seq_len)  # refuses a start not --seq-len halved
    ramp = getattr(config, "batch_size_warmup", 0), getattr(config, "batch_size_start", None)
    batch_warmup(*ramp, batch, stages, sequence)  # refuses a layout or a start it cannot ramp
    if "scheduler" in ds and _named_schedule(config):
        del ds["scheduler"]  # --schedule wsd / FILE / --decay-from name dsllm's phases: they replace the JSON's
    partition = getattr(config, "pipeline_partition", "blocks")
    if tensor > 1:
        ds["tensor_parallel"] = autotp_section(model, tensor, vocabulary_parallel=stages == 1)
    return RunSpec(world, model, seq_len, batch, precision, stage, ds, stages, partition, tensor, experts, sequence)


def model_for_data(config: TrainConfig, vocab_size: int) -> ModelConfig:
    """The model of --model and --model.FIELD, its vocabulary sized to the dataset's tokenizer."""
    model = resolve_model_config(config.model or DEFAULT_MODEL, config.model_overrides)
    if "vocab_size" not in config.model_overrides:  # a preset's vocabulary gives way to the dataset's tokenizer
        padded = VOCAB_MULTIPLE * math.ceil(vocab_size / VOCAB_MULTIPLE)
        return dataclasses.replace(model, vocab_size=padded)
    if model.vocab_size < vocab_size:
        raise ConfigError(
            f"--model.vocab_size {model.vocab_size} is smaller than the dataset's vocabulary "
            f"({vocab_size}); drop the override or raise it to at least {vocab_size}"
        )
    return model


def preflight(config: TrainConfig, world: World | None = None) -> Pretraining:
    """Resolve and check data, model, DeepSpeed JSON and resume point; raise UserError on any mismatch."""
    from dsllm.data.mixture import open_mixture, open_source, parse_data

    world = world or World.from_env()
    load_ds_config(config.ds_config)  # a missing or malformed JSON is the first thing to say
    branch = None
    if config.decay_from is not None:
        from dsllm.cooldown import branch_of

        if config.init is not None:
            raise UserError(
                f"--decay-from {config.decay_from} with --init {config.init}: a cooldown continues its checkpoint's "
                "whole state; drop --init"
            )
        config, branch = branch_of(config)  # --max-steps: the decay's end; --resume: the checkpoint
    if config.init is not None:
        from dsllm.model_dir import model_inputs
        from dsllm.paths import check_output_apart

        check_output_apart(config.out, "--out", model_inputs(config.init, "--init"))
    parsed = None if config.data is None else parse_data(config.data)
    mixture = None if parsed is None else open_mixture(parsed)
    if mixture is not None:
        sources, data_dir = list(mixture.sources), mixture.sources[0].dir
    else:
        if config.data is None:
            from dsllm.data.default_corpus import build_default_dataset

            data_dir = build_default_dataset(log=print if world.is_main else (lambda message: None))
        else:
            data_dir = Path(config.data)
        sources = [open_source(data_dir.name, data_dir, f"--data {data_dir}")]
    train, val = sources[0].train, sources[0].val
    if config.init is None:
        model = model_for_data(config, train.vocab_size)
    else:
        from dsllm.continued import init_model_config

        model = init_model_config(config, train.header.tokenizer_hash, data_dir)
    model.check_seq_len(config.seq_len or model.max_seq_len)
    seq_len = config.seq_len or model.max_seq_len
    for source in sources:
        source.check_seq_len(seq_len)
    spec = resolve_spec(config, model, world)
    if mixture is not None:
        mixture.boundaries(spec.batch.global_size, spec.seq_len)  # refuses a schedule out of order
        if config.batch_size_warmup and len(mixture.phases) > 1:
            raise UserError(
                f"--batch-size-warmup with the schedule of --data {config.data}: not supported yet (its phases start "
                "at a step x the full global batch); drop one of them"
            )
    from dsllm.checkpoint.checkpointer import Checkpointer
    from dsllm.checkpoint.store import Marker

    fingerprint = train.fingerprint if mixture is None else mixture.fingerprint
    if branch is not None:
        from dsllm.cooldown import check_branch

        check_branch(branch, config, spec, fingerprint)
    checkpointer = Checkpointer.for_run(config, spec, fingerprint)
    check_resume_optimizer(spec.ds, checkpointer.resume_from)
    if branch is not None:
        from dsllm.cooldown import check_layout

        check_layout(checkpointer, config)
    schedule, budget = None, None
    if "scheduler" not in spec.ds:
        schedule = branch.schedule if branch is not None else config.lr_schedule()
        if config.decay_in_budget:  # resumed after its decision: the phases config.json recorded
            from dsllm.cooldown import budget_decay

            budget = budget_decay(config, schedule, checkpointer.resume_from, world.is_main)
            schedule = budget.schedule
        marker = Marker.read(checkpointer.resume_from) if checkpointer.resume_from is not None else None
        note = None if marker is None else schedule.change_note(Path(config.out) / "config.json", marker.step)
        if note and world.is_main:
            print(note, flush=True)
    weights = None
    if config.init is not None and checkpointer.resume_from is None:  # a run with checkpoints of its own resumes them
        from dsllm.continued import init_weights

        weights = init_weights(config.init, spec.model)
    if mixture is not None and world.is_main:
        for note in mixture.spec.notes:  # weights scaled to sum to 1: said once, before the run starts
            print(note, flush=True)
    return Pretraining(config, spec, data_dir, train, val, checkpointer, weights, mixture, schedule, budget)


def write_run_files(plan: Pretraining) -> Path:
    """config.json (model, options, data, resolved run, DeepSpeed JSON, versions, command, environment) and the
    tokenizer, into the run folder (rank 0)."""
    import deepspeed
    import torch

    from dsllm import __version__
    from dsllm.checkpoint.store import write_json_atomic
    from dsllm.model_dir import CONFIG_FILE
    from dsllm.tokenizer import TOKENIZER_FILE

    spec, out = plan.spec, Path(plan.config.out)
    out.mkdir(parents=True, exist_ok=True)
    if plan.mixture is None:
        data = {
            "dir": str(plan.data_dir.resolve()),
            "train_fingerprint": plan.train.fingerprint,
            "val_fingerprint": plan.val.fingerprint,
        }
    else:
        data = {"mixture": plan.mixture.record(spec.batch.global_size, spec.seq_len)}
    record = {
        "model": spec.model.to_dict(),
        "train": dataclasses.asdict(plan.config),
        "data": {
            **data,
            "tokenizer_hash": plan.train.header.tokenizer_hash.hex(),
            "vocab_size": plan.train.vocab_size,
        },
        "run": {
            "seq_len": spec.seq_len,
            "micro_batch_size": spec.batch.micro,
            "grad_accum": spec.batch.accumulation,
            "world_size": spec.world.size,
            "global_batch_size": spec.batch.global_size,
            "tokens_per_step": spec.tokens_per_step,
            "precision": spec.precision,
            "zero_stage": spec.zero_stage,
            "pipeline_stages": spec.pipeline_stages,
            "tensor_parallel": spec.tensor_parallel,
            "expert_parallel": spec.expert_parallel,
            "sequence_parallel": spec.sequence_parallel,
            "data_parallel_size": spec.data_parallel_size,
        },
        "deepspeed": spec.ds,
        # the lr's phases (dsllm.schedule): a branch off this run, and the report, read them back
        "schedule": plan.schedule_record(),
        "versions": {
            "dsllm": __version__,
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "python": sys.version.split()[0],
        },
        "command": sys.argv,
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(RECORDED_ENV)},
    }
    write_json_atomic(out / CONFIG_FILE, record)
    shutil.copyfile(plan.data_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return out


def make_loader(plan: Pretraining, device):
    """The training batches: worker processes prefetch, pinned memory on GPU so `.to(device, non_blocking=True)`
    overlaps the copy with compute. A mixture's come from every source, in its order (dsllm.data.mixture)."""
    from dsllm.data.loader import MixtureWindows, ResumableLoader, TokenWindows

    spec = plan.spec
    piece = (spec.sequence_parallel_rank, spec.sequence_parallel)
    if plan.mixture is None:
        windows = TokenWindows(plan.train, spec.seq_len, piece=piece)
    else:
        windows = MixtureWindows(
            {s.name: TokenWindows(s.train, spec.seq_len, piece=piece) for s in plan.mixture.sources},
            plan.mixture.boundaries(spec.batch.global_size, spec.seq_len),
        )
    return ResumableLoader(
        windows,
        spec.batch.micro,
        plan.config.seed,
        spec.data_parallel_rank,  # a pipeline's stages (a sequence group's ranks) read the same samples (pieces)
        spec.data_parallel_size,
        num_workers=plan.config.loader_workers,
        pin_memory=device.type == "cuda",
        max_epochs_warning=plan.config.max_epochs_warning,
    )


class WindowValidator:
    """Validation loss, perplexity and bits per byte on the same fixed windows at every evaluation. A mixture
    scores --eval-windows windows of each source's val split: `val_loss_by_source` each, and `val_loss` over all
    of them (every source with the same number of windows counts alike, whatever the weights in force)."""

    def __init__(self, plan: Pretraining, engine, device, log, data):
        from dsllm.data.loader import TokenWindows
        from dsllm.scoring import eval_indices, token_byte_lengths
        from dsllm.tokenizer import TOKENIZER_FILE, load_tokenizer

        self.plan, self.engine, self.device, self.log, self.data = plan, engine, device, log, data
        vals = {None: plan.val} if plan.mixture is None else {s.name: s.val for s in plan.mixture.sources}
        self.sets = {}  # source name (None: the one dataset) -> (windows, their fixed indices)
        for name, val in vals.items():
            windows = TokenWindows(val, plan.spec.seq_len)
            self.sets[name] = (windows, eval_indices(windows, plan.config.eval_windows))
        tokenizer = load_tokenizer(plan.data_dir / TOKENIZER_FILE)
        self.byte_lengths = token_byte_lengths(tokenizer)
        self.score = engine.score
        if plan.config.document_mask:  # scored as trained: attention inside each document
            from dsllm.data.documents import document_scored
            from dsllm.tokenizer import eot_id

            self.score = document_scored(engine.score, eot_id(tokenizer))

    def should_validate(self, step: int, last_step: bool) -> bool:
        return step % self.plan.config.eval_interval == 0 or last_step

    def validate(self, step: int) -> dict:
        from dsllm.scoring import score_totals, scores

        spec = self.plan.spec
        # the routing of this rank's last training micro batch (a Mixture-of-Experts model), before evaluation's own
        routing = getattr(self.engine.ds.module, "moe_stats", lambda: None)()
        z_loss = getattr(self.engine.ds.module, "last_z_loss", None)  # (its last training micro batch's, unweighted)
        totals = {
            name: score_totals(
                self.score,
                windows,
                indices,
                spec.batch.micro,
                self.device,
                self.byte_lengths,
                spec.data_parallel_rank,
                spec.data_parallel_size,
                counted=spec.tensor_parallel_rank == 0 and spec.sequence_parallel_rank == 0,
            )
            for name, (windows, indices) in self.sets.items()
        }
        result = scores(*(sum(parts) for parts in zip(*totals.values())))
        line = (
            f"eval step {step} | val loss {result['val_loss']:.4f} | ppl {result['perplexity']:.2f} | "
            f"bits/byte {result['bits_per_byte']:.4f}"
        )
        if self.plan.mixture is not None:
            result["val_loss_by_source"] = {name: scores(*parts)["val_loss"] for name, parts in totals.items()}
            line += " | by source: " + ", ".join(f"{n} {v:.4f}" for n, v in result["val_loss_by_source"].items())
        extra = {}
        if routing is not None:
            extra = {"moe": routing}
            line += (
                f" | experts: aux loss {routing['aux_loss']:.4f}, token share {routing['expert_share_min']:.2f}-"
                f"{routing['expert_share_max']:.2f}, dropped {100 * routing['dropped_fraction']:.1f}%"
            )
        if z_loss is not None:
            extra["z_loss"] = float(z_loss)
            line += f" | z-loss {extra['z_loss']:.4f} (weight {spec.model.z_loss:g})"
        self.log.write({"step": step, **result, **extra, "samples": self.data.consumed_samples}, line)
        return result


def consolidate(checkpoint: Path, out: Path) -> Path:
    """Write the fp32 weights of a checkpoint as RUN_DIR/model.safetensors (a model folder for generate/export)."""
    from safetensors.torch import save_model

    from dsllm.model_dir import WEIGHTS_FILE, load_model_dir

    partial = out / (WEIGHTS_FILE + ".partial")
    save_model(load_model_dir(checkpoint), str(partial))
    os.replace(partial, out / WEIGHTS_FILE)
    return out / WEIGHTS_FILE


def sample_text(plan: Pretraining, device) -> str:
    """The first validation document's first 16 tokens and the model's continuation, each marked."""
    from dsllm.model_dir import load_model_dir
    from dsllm.tokenizer import TOKENIZER_FILE, eot_id, load_tokenizer

    tokenizer = load_tokenizer(plan.data_dir / TOKENIZER_FILE)
    model = load_model_dir(plan.config.out, device=device)
    prompt = plan.val.document(0)[:16].tolist()
    count = min(plan.config.sample_tokens, plan.spec.model.max_seq_len - len(prompt))
    new = model.generate(
        [prompt],
        count,
        temperature=0.8,
        top_k=50,
        eos_id=eot_id(tokenizer),
        seed=plan.config.seed,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )[0]
    return (
        f"sample: prompt ({len(prompt)} tokens of the validation split):\n{tokenizer.decode(prompt)}\n"
        f"sample: the model's continuation ({len(new)} tokens, temperature 0.8, top-k 50):\n{tokenizer.decode(new)}"
    )


def run(plan: Pretraining) -> dict:
    """Train the checked run to the end; returns {"step", "val_loss", ...} of the final evaluation."""
    import torch.distributed as dist

    from dsllm.engine import (
        apply_schedule,
        build_engine,
        document_window_loss,
        engine_options,
        init_distributed,
        new_model,
        window_loss,
    )
    from dsllm.loop import loop_settings, step_log_for, train_loop
    from dsllm.metrics import MetricsLog
    from dsllm.model_dir import WEIGHTS_FILE
    from dsllm.run_control import RunLock

    config, spec, checkpointer = plan.config, plan.spec, plan.checkpointer
    world = spec.world
    lock = RunLock(Path(config.out)).acquire() if world.is_main else None  # one trainer per run folder
    device = init_distributed(world, config.collective_timeout)
    checkpointer.verify()
    checkpointer.start_lineage()
    if world.is_main:
        write_run_files(plan)
    import torch

    torch.manual_seed(config.seed)
    model = new_model(spec, plan.init_weights)  # (no weights when the run resumes a checkpoint of its own)
    if plan.init_weights is not None:
        plan.init_weights.close()
        _say(world, f"starting from the weights of {config.init}, with a fresh optimizer and schedule")
    loss_of = window_loss
    if spec.sequence_parallel > 1:  # (its validation: Engine.score)
        from dsllm.sequence_parallel import SequenceSplit

        loss_of = SequenceSplit.of(spec.sequence_parallel).window_loss
    elif config.document_mask:  # (its validation too: WindowValidator)
        from dsllm.tokenizer import TOKENIZER_FILE, eot_id, load_tokenizer

        loss_of = document_window_loss(eot_id(load_tokenizer(plan.data_dir / TOKENIZER_FILE)))
    warmup = seq_len_warmup(config.seq_len_warmup, config.seq_len_start, spec.seq_len)
    if warmup is not None:  # (validation scores full windows)
        loss_of = warmup.loss(loss_of)
    ramp = batch_warmup(config.batch_size_warmup, config.batch_size_start, spec.batch)
    options = engine_options(config, plan.budget or plan.schedule)  # (a BudgetDecay's factor follows its decision)
    engine = build_engine(spec, model, device, loss_of, **options, load_universal=checkpointer.universal)
    loader = make_loader(plan, device)
    step, counters = 0, {"nonfinite_in_a_row": 0, "skipped_steps": 0}
    if checkpointer.resume_from is not None:
        state = checkpointer.load(engine)
        loader.load_state_dict(state["data"])  # refuses another dataset (fingerprint) loudly
        step, counters = state["step"], state["counters"]
        if config.decay_from is not None:  # the source's scheduler state, on the branch's phases from this step on
            apply_schedule(engine)
        if warmup is not None and engine.ds.global_steps != step:  # the window length is read from global_steps
            raise RuntimeError(f"DeepSpeed restored global_steps {engine.ds.global_steps} at step {step}")
        how = ""
        if checkpointer.universal:
            how = " through a universal checkpoint (world size, ZeRO stage or parallel layout changed)"
        _say(
            world,
            f"resumed from {checkpointer.resume_from}{how} at step {step} ({loader.consumed_samples} samples consumed)",
        )
    log = MetricsLog(Path(config.out) / "metrics.jsonl", world.is_main, getattr(engine.ds, "monitor", None))
    validator = WindowValidator(plan, engine, device, log, loader)
    _say(
        world,
        f"training {spec.model.num_parameters():,} parameters on {world.size} rank(s)"
        + spec.layout()
        + f", ZeRO-{spec.zero_stage}, "
        f"{spec.precision}, global batch {spec.batch.global_size} x {spec.seq_len} tokens, "
        + (f"windows from {warmup.start} tokens over {warmup.steps} steps, " if warmup is not None else "")
        + (f"batch from {ramp.global_batch(0)} over {ramp.steps} steps, " if ramp is not None else "")
        + (f"lr {plan.schedule.describe()}, " if plan.schedule is not None and _named_schedule(config) else "")
        + f"{plan.max_steps} steps"
        + (_budget_words(plan.budget) if plan.budget is not None else "")
        + f" -> {config.out}",
    )
    settings, step_log = loop_settings(config), step_log_for(config, spec, log, device, step, warmup, ramp)
    settings.max_steps = step_log.max_steps = plan.max_steps
    step, result = train_loop(
        engine,
        loader,
        settings=settings,
        start_step=step,
        counters=counters,
        validator=validator,
        checkpointer=checkpointer,
        step_log=step_log,
        rank=world.rank,
        ending=plan.budget,
        batch_warmup=ramp,
    )
    if result is None:  # resumed at max_steps: nothing to train, still report
        engine.ds.eval()
        result = validator.validate(step)
    if world.is_main and checkpointer.last_saved is not None:
        consolidate(checkpointer.last_saved, Path(config.out))
    dist.barrier()
    if world.is_main:
        print(
            f"final validation loss {result['val_loss']:.4f} | perplexity {result['perplexity']:.2f} | "
            f"bits/byte {result['bits_per_byte']:.4f} | weights {Path(config.out) / WEIGHTS_FILE}",
            flush=True,
        )
        if config.sample_tokens > 0:
            print(sample_text(plan, device), flush=True)
    log.close()
    engine.teardown()
    if lock is not None:
        lock.release()
    return {"step": step, **result}


def _budget_words(budget: BudgetDecay) -> str:
    if budget.decided is not None:
        return f" (the decay decided at step {budget.decided['step']} by {budget.decided['budget']})"
    names = " / ".join(f"{b.name} {b.size:g}" for b in budget.budgets)
    return f" at most (the decay starts at the last {budget.config.decay_fraction:g} of {names})"


def _named_schedule(config: TrainConfig) -> bool:
    """Whether the run's lr follows phases the user named (wsd, a file, a cooldown): they replace the JSON's
    scheduler, and are worth a line at the start."""
    return config.schedule != "cosine" or getattr(config, "decay_from", None) is not None


def _say(world: World, message: str) -> None:
    if world.is_main:
        print(message, flush=True)


def model_fields_help() -> str:
    """The --model.FIELD options, a line of meaning each (from ModelConfig's field docstrings)."""
    from dsllm.cli_args import field_docs
    from dsllm.model_config import ModelConfig

    docs = field_docs(ModelConfig)
    width = max(map(len, docs)) + len("--model.")
    lines = [f"  --model.{name:<{width - 8}}  {text}" for name, text in docs.items()]
    return "model fields (--model.FIELD VALUE, over the preset's):\n" + "\n".join(lines)


def build_parser() -> ArgumentParser:
    from dsllm.model_config import PRESETS

    parser = ArgumentParser(
        prog="dsllm pretrain",
        description="Pretrain a GPT on the DeepSpeed engine:\n"
        "  deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json [options]\n"
        "  (or `dsllm pretrain ...` / `python launch/pretrain.py ...` for one process)\n"
        "Model: --model PRESET_OR_JSON, then any field with --model.FIELD VALUE (e.g. --model.norm rmsnorm).\n"
        f"Presets: {', '.join(PRESETS)}.\n"
        "A whole run can be one file: --recipe launch/recipes/NAME.yaml (options given here override it).",
        epilog=model_fields_help(),
    )
    add_recipe_argument(parser)
    add_config_arguments(parser, TrainConfig, skip=("model_overrides",))
    add_launcher_argument(parser)
    return parser


def parse_args(argv: list[str] | None) -> TrainConfig:
    return parse_config(TrainConfig, build_parser(), argv, model_overrides=True)


def main(argv: list[str] | None = None) -> int:
    from dsllm.run_control import run_training

    world = World.from_env()
    return run_training(lambda: preflight(parse_args(argv), world), run, world)
