"""Pretraining on the DeepSpeed engine: pre-flight checks, the loop, evaluation, checkpoints, resume.

`launch/pretrain.py` parses the command line and calls `main`. Every check that can fail on the
user's input runs before any rank initialises the process group or builds the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from dsllm import __version__
from dsllm.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model_dir, load_rng, require_model_states, save_rng
from dsllm.data.format import TokenFile
from dsllm.data.loader import ResumableLoader, TokenWindows
from dsllm.ds_config import RunValues, load_ds_config, resolve_ds_config
from dsllm.errors import USER_ERROR_EXIT, UserError
from dsllm.evaluation import eval_indices, evaluate, token_byte_lengths
from dsllm.metrics import MetricsLog, format_step, memory_gib, mfu, peak_tflops
from dsllm.model import GPT, flops_per_token
from dsllm.model_config import ConfigError, ModelConfig, resolve_model_config
from dsllm.run_control import (
    STOPPED_EXIT,
    RunLock,
    StopRequest,
    Watchdog,
    control_group,
    kill_local_peers,
    local_peer_pids,
)
from dsllm.tokenizer import TOKENIZER_FILE, eot_id, load_tokenizer, tokenizer_hash
from dsllm.train_checkpoint import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    checkpoint_files,
    checksum_problem,
    commit,
    continues_branch,
    current_branch,
    file_digests,
    lineage_candidates,
    prune,
    read_marker,
    remove_leftovers,
    resume_candidates,
    size_problem,
    staging_dir,
    start_branch,
    tag_for,
    write_json_atomic,
)
from dsllm.train_config import TrainConfig, world_from_env

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
)  # what changes a run's speed or placement: kept in config.json
VOCAB_MULTIPLE = 64  # embedding rows padded so matmuls tile well; the extra ids are never produced


class TrainingAborted(Exception):
    """Training stopped for a reason found while running (not a bad input)."""


class RunStopped(Exception):
    """Training stopped on a signal (preemption, Ctrl-C) after saving a checkpoint."""


@dataclasses.dataclass
class Plan:
    """Everything pre-flight resolves, before the process group exists."""

    config: TrainConfig
    rank: int
    local_rank: int
    world_size: int
    data_dir: Path
    train: TokenFile
    val: TokenFile
    model: ModelConfig
    seq_len: int
    ds: dict
    batch: object
    precision: str
    zero_stage: int
    resume_from: Path | None
    universal: bool = False  # the checkpoint's world size or ZeRO stage differs: load through a universal checkpoint
    fallbacks: list = dataclasses.field(
        default_factory=list
    )  # older checkpoints of the lineage, when resume_from is damaged


def _log(plan_or_rank, message: str) -> None:
    rank = plan_or_rank if isinstance(plan_or_rank, int) else plan_or_rank.rank
    if rank == 0:
        print(message, flush=True)


def _model_config(config: TrainConfig, vocab_size: int) -> ModelConfig:
    model = resolve_model_config(config.model, config.model_overrides)
    explicit_vocab = "vocab_size" in config.model_overrides
    if not explicit_vocab:  # a preset's vocabulary gives way to the dataset's tokenizer
        padded = VOCAB_MULTIPLE * math.ceil(vocab_size / VOCAB_MULTIPLE)
        model = dataclasses.replace(model, vocab_size=padded)
    elif model.vocab_size < vocab_size:
        raise ConfigError(
            f"--model.vocab_size {model.vocab_size} is smaller than the dataset's vocabulary "
            f"({vocab_size}); drop the override or raise it to at least {vocab_size}"
        )
    return model


def preflight(config: TrainConfig) -> Plan:
    """Resolve and check data, model, DeepSpeed JSON and resume point; raise UserError on any mismatch."""
    rank, local_rank, world_size = world_from_env()
    ds_raw = load_ds_config(config.ds_config)
    if config.data is None:
        from dsllm.data.default_corpus import build_default_dataset

        data_dir = build_default_dataset(log=lambda m: _log(rank, m))
    else:
        data_dir = Path(config.data)
        if not (data_dir / "meta.json").is_file():
            raise UserError(
                f"--data {data_dir}: not a prepared dataset (no meta.json); create it with data_pipeline/prepare.py"
            )
    train, val = TokenFile(data_dir / "train"), TokenFile(data_dir / "val") if (data_dir / "val.idx").exists() else None
    if val is None:
        raise UserError(f"--data {data_dir}: has no val split; re-run prepare with --val-fraction above 0")
    tokenizer = load_tokenizer(data_dir / TOKENIZER_FILE)
    if tokenizer_hash(tokenizer) != train.header.tokenizer_hash:
        raise UserError(
            f"{data_dir / TOKENIZER_FILE}: does not match the tokenizer the dataset was made with; "
            "run data_pipeline/validate.py and re-create the dataset"
        )
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for split in (train, val):  # ids past the tokenizer train silently on padded rows, or crash the embedding
        largest = split.max_token_id()
        if largest >= vocab_size:
            raise UserError(
                f"{split.bin_path}: token id {largest} is not below the tokenizer's vocabulary size "
                f"{vocab_size}; re-create the dataset with data_pipeline/prepare.py"
            )
    model = _model_config(config, train.vocab_size)
    seq_len = config.seq_len or model.max_seq_len
    model.check_seq_len(seq_len)
    for name, split in (("train", train), ("val", val)):
        if split.num_tokens <= seq_len:
            raise UserError(
                f"--data {data_dir}: the {name} split has {split.num_tokens} tokens, not one window of "
                f"{seq_len + 1}; use a shorter --seq-len or more data"
            )
    ds, batch, precision, stage = deepspeed_config(config, ds_raw, model, world_size)
    plan = Plan(
        config, rank, local_rank, world_size, data_dir, train, val, model, seq_len, ds, batch, precision, stage, None
    )
    candidates, explicit = resume_candidates(config.resume, Path(config.out))
    choose_resume(plan, candidates, explicit, lambda path, marker: size_problem(path, marker))
    return plan


def choose_resume(plan: Plan, candidates: list[Path], explicit: bool, problem_of) -> None:
    """Set plan.resume_from to the first candidate without a problem (`problem_of(path, marker)`), saying why
    each newer one was passed over; an explicit --resume PATH with a problem is refused."""
    for i, path in enumerate(candidates):
        marker = read_marker(path)
        problem = "its marker is unreadable" if marker is None else problem_of(path, marker)
        if problem is None:
            plan.resume_from, plan.fallbacks = path, candidates[i + 1 :]
            plan.universal = _needs_universal(
                marker, path, plan.model, plan.world_size, plan.zero_stage, plan.precision
            )
            checkpoint = {k: v for k, v in plan.ds.get("checkpoint", {}).items() if k != "load_universal"}
            plan.ds["checkpoint"] = {**checkpoint, **({"load_universal": True} if plan.universal else {})}
            if not plan.ds["checkpoint"]:
                del plan.ds["checkpoint"]
            return
        if explicit:
            raise UserError(f"{path}: damaged checkpoint ({problem}); resume from another one with --resume PATH")
        _log(plan, f"checkpoint {path} is damaged ({problem}); falling back to the one before it")
    plan.resume_from, plan.universal, plan.fallbacks = None, False, []
    if candidates:
        raise UserError(
            f"{Path(plan.config.out) / CHECKPOINTS_DIR}: every checkpoint of this run is damaged; start "
            "again with --resume none and a new --out, or pass a checkpoint with --resume PATH"
        )


def deepspeed_config(config: TrainConfig, ds_raw: dict, model: ModelConfig, world_size: int):
    """(the DeepSpeed JSON with its "auto" fields filled, batch, precision, ZeRO stage) for this hardware."""
    on_gpu = torch.cuda.is_available()
    supports_bf16 = torch.cuda.is_bf16_supported() if on_gpu else True
    run = RunValues(
        config.micro_batch_size,
        config.grad_accum,
        config.global_batch_size,
        config.lr,
        config.min_lr_ratio,
        config.warmup,
        config.max_steps,
        config.weight_decay,
        (config.beta1, config.beta2),
        config.grad_clip,
        config.precision,
        model.d_model,
    )
    return resolve_ds_config(ds_raw, run, world_size, config.ds_config, supports_bf16, on_gpu)


def _needs_universal(
    marker: dict, checkpoint: Path, model: ModelConfig, world_size: int, stage: int, precision: str
) -> bool:
    """Whether resuming needs DeepSpeed's universal checkpoint (another world size or ZeRO stage);
    combinations DeepSpeed cannot load are refused here with what to do instead."""
    if marker["model"] != model.to_dict():
        changed = sorted(k for k in marker["model"] if marker["model"][k] != model.to_dict().get(k))
        raise UserError(
            f"{checkpoint}: saved from a model that differs in {', '.join(changed)}; resume with the "
            "same --model options, or start a new run with another --out"
        )
    if marker["precision"] != precision:
        raise UserError(
            f"{checkpoint}: saved in {marker['precision']}, this run would train in {precision}; "
            f"pass --precision {marker['precision']} to resume it"
        )
    saved_world, saved_stage = marker["world_size"], marker["zero_stage"]
    if saved_stage == stage and (saved_world == world_size or stage == 0):
        return False  # ZeRO-0 keeps whole optimizer state on every rank: it loads on any world size
    if 0 in (saved_stage, stage):
        raise UserError(
            f"{checkpoint}: saved with ZeRO stage {saved_stage}, this run has stage {stage}; DeepSpeed's "
            "universal checkpoint converts only between stages 1-3: resume with ZeRO-"
            f"{saved_stage} (--ds_config ds_configs/zero{saved_stage}.json)"
        )
    if saved_stage == 3 and stage != 3:
        raise UserError(
            f"{checkpoint}: a ZeRO-3 checkpoint cannot be resumed on ZeRO-{stage}: DeepSpeed 0.19.8's universal "
            "checkpoint from stage 3 lacks the files stages 1-2 load; resume on ZeRO-3 with any number "
            "of ranks, or start a new run from its weights (consolidate) with another --out"
        )
    if stage == 3 and saved_stage != 3:
        raise UserError(
            f"{checkpoint}: a ZeRO-{saved_stage} checkpoint cannot be resumed on ZeRO-3: DeepSpeed 0.19.8 "
            "fails to load it (universal checkpoint into stage 3); resume on ZeRO-1 or ZeRO-2 with any "
            "number of ranks, or start a ZeRO-3 run from its weights with a new --out"
        )
    return True


def _universal_dir(checkpoint: Path) -> Path:
    return checkpoint.parent / f"{checkpoint.name}-universal"


def convert_to_universal(checkpoint: Path) -> Path:
    """`ds_to_universal` once per checkpoint (rank 0), cached next to it; a marker says it is complete."""
    import subprocess

    target = _universal_dir(checkpoint)
    if (target / COMPLETE_MARKER).is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    # DeepSpeed's ds_to_universal, with weights-only loads (dsllm.safe_load)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsllm.safe_load",
            "universal",
            "--input_folder",
            str(checkpoint),
            "--output_folder",
            str(target),
            "--inject_missing_state",
        ],
        capture_output=True,
        text=True,
    )
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    if proc.returncode == USER_ERROR_EXIT:  # a refused file: its one line says which
        raise UserError(tail[0].removeprefix("error: "))
    if proc.returncode != 0:
        raise UserError(
            f"{checkpoint}: conversion to a universal checkpoint failed ({tail[0][:200]}); resume with "
            "the world size and ZeRO stage it was saved with"
        )
    shutil.copyfile(checkpoint / COMPLETE_MARKER, target / COMPLETE_MARKER)
    return target


# -- distributed set-up ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(plan: Plan) -> torch.device:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and plan.world_size == 1:  # a plain `python launch/pretrain.py`
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", plan.world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))  # ranks must not oversubscribe cores
    # NCCL: a failed or timed-out collective aborts the communicator (an exception) instead of hanging the rank
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        distributed_port=int(os.environ.get("MASTER_PORT", 29500)),  # used by MPI discovery
        timeout=timedelta(seconds=plan.config.collective_timeout),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(plan.local_rank)
        return torch.device("cuda", plan.local_rank)
    _unlink_shm_buffer()
    return torch.device("cpu")


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU shared-memory all-reduce (all ranks on one host) creates a 69 MB /dev/shm file per rank and
    never removes it: every run leaked rank x 69 MB of RAM until /dev/shm filled and the OOM killer came. Once
    every rank has mapped every buffer (init_distributed returned on all of them), the names can go: the
    mappings stay valid until the processes exit, and then the memory is freed."""
    import torch.distributed as dist

    if os.environ.get("LOCAL_SIZE") == str(dist.get_world_size()):  # DeepSpeed's own condition: the same on every rank
        dist.barrier()
        name = (
            f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
        )
        (Path("/dev/shm") / name).unlink(missing_ok=True)


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    """Decay matrices; not norms, biases or embeddings (a tied head is the embedding)."""
    no_decay_ids = {id(model.tok_embeddings.weight)}
    if model.pos_embeddings is not None:
        no_decay_ids.add(id(model.pos_embeddings.weight))
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim < 2 or id(param) in no_decay_ids else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(config: TrainConfig):
    """Linear warmup from 0, cosine decay to `min_lr_ratio * lr` at max_steps (when the JSON has no scheduler)."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / (config.warmup + 1)
        progress = min(1.0, (step - config.warmup) / max(1, config.max_steps - config.warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@contextlib.contextmanager
def _skipped_update(optimizer):
    """ZeRO-0 in fp32 has no DeepSpeed wrapper that skips a non-finite step: make this step one the
    engine treats as an overflow (no update, no scheduler step, counted in engine.skipped_steps)."""
    had_overflow = "overflow" in vars(optimizer)
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        del optimizer.step
        if had_overflow:
            optimizer.overflow = False
        else:
            del optimizer.overflow


def build_engine(plan: Plan, device: torch.device, model: GPT | None = None):
    """The DeepSpeed engine around a new model (seeded), or around `model` (fine-tuning starts from weights)."""
    import deepspeed

    config = plan.config
    torch.manual_seed(config.seed)
    model = GPT(plan.model) if model is None else model
    groups = param_groups(model, config.weight_decay)
    optimizer = lr_scheduler = None
    if "optimizer" not in plan.ds:
        optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda"
        )
    if "scheduler" not in plan.ds:
        lr_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(config))  # noqa: E731
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # its scheduler warns about reading the lr before step 1
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, lr_scheduler=lr_scheduler, config=plan.ds
        )
    finally:
        ds_logger.setLevel(level)
    if config.compile:  # compiled in place: parameter names and checkpoints stay those of the eager model
        engine.compile()
    return engine


def make_loader(plan: Plan, device: torch.device) -> ResumableLoader:
    """The training batches: worker processes prefetch, pinned memory on GPU so `.to(device, non_blocking=True)`
    overlaps the copy with compute."""
    return ResumableLoader(
        TokenWindows(plan.train, plan.seq_len),
        plan.batch.micro,
        plan.config.seed,
        plan.rank,
        plan.world_size,
        num_workers=plan.config.loader_workers,
        pin_memory=device.type == "cuda",
    )


class TimedBatches:
    """Wraps the batch iterator and adds up the seconds the step waited for data (logged as data_wait_fraction)."""

    def __init__(self, batches):
        self.batches, self.seconds = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        start = time.perf_counter()
        batch = next(self.batches)
        self.seconds += time.perf_counter() - start
        return batch


def train_step(plan: Plan, engine, batches, device: torch.device) -> tuple[torch.Tensor, bool]:
    """One optimizer step (gradient accumulation included): returns (mean loss, still on the device; applied).

    It makes no host sync of its own: DeepSpeed's ZeRO, bf16 and fp16 optimizers already decide, on the
    host, whether the gradients are finite and skip the update if not, and `was_step_applied()` reads
    that decision. Only ZeRO-0 in fp32 has no such check: there the loss flag is read before the step.
    (The benchmark times this very function.)"""
    loss_sum = torch.zeros((), device=device)
    for micro in range(plan.batch.accumulation):
        batch = next(batches)
        # [1]: the loss only. Holding the logits ([micro, T, vocab]) would keep them alive through the optimizer
        # step, the peak of model-state memory: 64 MiB for `tiny` at micro 8 x 256, 800 MiB for GPT-2 at 8 x 1024.
        if isinstance(batch, dict):  # fine-tuning: idx, targets, positions, mask (packed examples)
            loss = engine(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})[1]
        else:  # pretraining: windows of seq_len + 1 tokens
            batch = batch.to(device, non_blocking=True)
            loss = engine(batch[:, :-1], batch[:, 1:])[1]
        engine.backward(loss)
        loss_sum += loss.detach().float()
        if micro < plan.batch.accumulation - 1:
            engine.step()  # DeepSpeed only accumulates here
    loss_sum /= plan.batch.accumulation
    if plan.zero_stage == 0 and plan.precision == "fp32":
        import torch.distributed as dist

        finite = torch.isfinite(loss_sum).to(torch.float32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # a NaN on any rank reaches every rank's gradients
        if not finite.item():
            with _skipped_update(engine.optimizer):
                engine.step()
            return loss_sum, False
    engine.step()
    return loss_sum, engine.was_step_applied()


# -- the run --------------------------------------------------------------------------------------------
def write_run_files(plan: Plan) -> Path:
    import deepspeed

    out = Path(plan.config.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": plan.model.to_dict(),
        "train": dataclasses.asdict(plan.config),
        "data": {
            "dir": str(plan.data_dir.resolve()),
            "train_fingerprint": plan.train.fingerprint,
            "val_fingerprint": plan.val.fingerprint,
            "tokenizer_hash": plan.train.header.tokenizer_hash.hex(),
            "vocab_size": plan.train.vocab_size,
        },
        "run": {
            "seq_len": plan.seq_len,
            "micro_batch_size": plan.batch.micro,
            "grad_accum": plan.batch.accumulation,
            "world_size": plan.world_size,
            "global_batch_size": plan.batch.global_size,
            "tokens_per_step": plan.batch.global_size * plan.seq_len,
            "precision": plan.precision,
            "zero_stage": plan.zero_stage,
        },
        "deepspeed": plan.ds,
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


def save_checkpoint(
    plan: Plan, engine, loader: ResumableLoader, step: int, counters: dict, lineage: dict, val_loss: float | None
) -> Path:
    """Write a checkpoint into a staging folder on every rank, hash its files (each rank a share), and let rank 0
    put the marker in and rename it into place. Returns the checkpoint folder."""
    import torch.distributed as dist

    checkpoints = Path(plan.config.out) / CHECKPOINTS_DIR
    staging = staging_dir(checkpoints, step)
    if plan.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # the same save of an earlier attempt that died
    dist.barrier()
    state = {
        "dsllm": {
            "step": step,
            "data": loader.state_dict(),
            "counters": dict(counters),
            "val_fingerprint": plan.val.fingerprint,
        }
    }
    engine.save_checkpoint(str(checkpoints), tag=staging.name, client_state=state, save_latest=False)
    save_rng(staging, plan.rank)
    if os.environ.get("DSLLM_FAULT") in (f"kill_in_save:{step}", f"kill_in_save:{step}:written"):  # test hook
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    names = [checkpoint_files(staging) if plan.rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    shares = [None] * plan.world_size
    dist.all_gather_object(shares, file_digests(staging, names[0][plan.rank :: plan.world_size]))
    if plan.rank == 0:  # the marker goes in last, then one rename: the folder is complete or absent
        commit(
            staging,
            {
                "step": step,
                "consumed_samples": loader.consumed_samples,
                "world_size": plan.world_size,
                "zero_stage": plan.zero_stage,
                "precision": plan.precision,
                "model": plan.model.to_dict(),
                "train_fingerprint": plan.train.fingerprint,
                "branch": lineage["branch"],
                "previous": lineage["previous"],
                "val_loss": val_loss,
                "files": {k: v for share in shares for k, v in share.items()},
            },
        )
        prune(checkpoints, plan.config.keep_checkpoints)
    dist.barrier()
    lineage["previous"] = tag_for(step)
    return checkpoints / tag_for(step)


def parameters_finite(engine, device: torch.device) -> bool:
    """Whether every parameter is finite on every rank (ZeRO-3: each rank checks its partition)."""
    import torch.distributed as dist

    flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all().to(device) for p in engine.module.parameters()]
    finite = torch.stack(flags).all().to(torch.float32) if flags else torch.ones((), device=device)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def verify_resume(plan: Plan) -> None:
    """Check the chosen checkpoint's files against the sha256 sums in its marker, each rank hashing a share;
    a damaged one (auto resume) gives way to the one before it, with a line saying why."""
    import torch.distributed as dist

    while plan.resume_from is not None:
        marker = read_marker(plan.resume_from) or {}
        names = sorted(marker.get("files") or {})
        verdicts = [None] * plan.world_size
        dist.all_gather_object(
            verdicts, checksum_problem(plan.resume_from, marker, names[plan.rank :: plan.world_size])
        )
        problem = next((v for v in verdicts if v), None)
        if problem is None:
            return
        remaining = plan.fallbacks
        explicit = plan.config.resume not in ("auto", "none")
        choose_resume(
            plan,
            [plan.resume_from, *remaining],
            explicit,
            lambda path, m, bad=plan.resume_from, why=problem: why if path == bad else size_problem(path, m),
        )


def load_checkpoint(plan: Plan, engine, loader: ResumableLoader) -> tuple[int, dict]:
    from dsllm.safe_load import weights_only_loads

    path = _universal_dir(plan.resume_from) if plan.universal else plan.resume_from
    if not plan.universal:  # (the universal folder is ours, converted just now)
        require_model_states(path, plan.zero_stage, plan.rank)
    try:
        with weights_only_loads():  # a crafted file is refused, never run
            _, client = engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except (OSError, RuntimeError, KeyError, AssertionError) as err:  # damaged or foreign checkpoint files
        detail = (str(err).strip().splitlines() or ["no message"])[0][:200]
        raise UserError(
            f"{path}: DeepSpeed could not load this checkpoint ({type(err).__name__}: {detail}); "
            "resume from another one with --resume PATH"
        ) from None
    if client is None:
        raise UserError(f"{path}: DeepSpeed could not load this checkpoint; resume from another one with --resume PATH")
    state = client["dsllm"]
    loader.load_state_dict(state["data"])  # refuses another dataset (fingerprint) loudly
    if not plan.universal:  # on another world size the per-rank streams do not map
        load_rng(path, plan.rank)
    return state["step"], state["counters"]


def consolidate(plan: Plan, checkpoint: Path) -> Path:
    """Write the final fp32 weights as RUN_DIR/model.safetensors (a model folder for generate/export)."""
    from safetensors.torch import save_model

    out = Path(plan.config.out)
    partial = out / (WEIGHTS_FILE + ".partial")
    save_model(load_model_dir(checkpoint), str(partial))
    os.replace(partial, out / WEIGHTS_FILE)
    return out / WEIGHTS_FILE


def _sample_text(plan: Plan, device) -> str:
    tokenizer = load_tokenizer(plan.data_dir / TOKENIZER_FILE)
    model = load_model_dir(plan.config.out, device=device)
    prompt = plan.val.document(0)[:16].tolist()
    new = model.generate(
        [prompt],
        min(plan.config.sample_tokens, plan.model.max_seq_len - len(prompt)),
        temperature=0.8,
        top_k=50,
        eos_id=eot_id(tokenizer),
        seed=plan.config.seed,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )[0]
    return tokenizer.decode(prompt + new)


def _start_lineage(plan: Plan) -> dict:
    """Rank 0 records which branch this run continues (or starts, after a rollback); every rank learns it."""
    import torch.distributed as dist

    checkpoints = Path(plan.config.out) / CHECKPOINTS_DIR
    decision = [None]
    if plan.rank == 0:
        remove_leftovers(checkpoints)
        if continues_branch(checkpoints, plan.resume_from):
            branch = current_branch(checkpoints)
        else:
            rollback = plan.resume_from is not None and current_branch(checkpoints) is not None
            branch = start_branch(checkpoints, plan.resume_from)
            if rollback:
                _log(
                    plan,
                    f"resuming from {plan.resume_from.name} starts a new branch of the run: --resume auto "
                    "follows it from now on, not the newer checkpoints it leaves behind",
                )
        decision = [{"branch": branch, "previous": plan.resume_from.name if plan.resume_from else None}]
    dist.broadcast_object_list(decision, src=0)
    return decision[0]


def _last_healthy(plan: Plan) -> str:
    done = lineage_candidates(Path(plan.config.out) / CHECKPOINTS_DIR)
    return str(done[0]) if done else "none"


def train(plan: Plan) -> dict:
    import torch.distributed as dist

    config = plan.config
    lock = RunLock(Path(config.out)).acquire() if plan.rank == 0 else None  # one trainer per run folder
    device = init_distributed(plan)
    verify_resume(plan)
    lineage = _start_lineage(plan)
    if plan.rank == 0:
        write_run_files(plan)
    engine = build_engine(plan, device)
    loader = make_loader(plan, device)
    step, counters = 0, {"nonfinite_in_a_row": 0, "skipped_steps": 0}
    if plan.universal:
        if plan.rank == 0:
            convert_to_universal(plan.resume_from)
        dist.barrier()
    if plan.resume_from is not None:
        step, counters = load_checkpoint(plan, engine, loader)
        how = " through a universal checkpoint (world size or ZeRO stage changed)" if plan.universal else ""
        _log(plan, f"resumed from {plan.resume_from}{how} at step {step} ({loader.consumed_samples} samples consumed)")
    val_windows = TokenWindows(plan.val, plan.seq_len)
    indices = eval_indices(val_windows, config.eval_windows)
    byte_lengths = token_byte_lengths(load_tokenizer(plan.data_dir / TOKENIZER_FILE))
    log = MetricsLog(Path(config.out) / "metrics.jsonl", plan.rank == 0, getattr(engine, "monitor", None))
    tokens_per_step = plan.batch.global_size * plan.seq_len
    flops = flops_per_token(plan.model, plan.seq_len)
    peak = config.peak_tflops or peak_tflops()
    _log(
        plan,
        f"training {plan.model.num_parameters():,} parameters on {plan.world_size} rank(s), ZeRO-{plan.zero_stage}, "
        f"{plan.precision}, global batch {plan.batch.global_size} x {plan.seq_len} tokens, "
        f"{config.max_steps} steps -> {config.out}",
    )
    local_peer_pids(plan.rank)
    watchdog = Watchdog(config.collective_timeout, plan.rank)
    group = control_group()
    stop = StopRequest(config.stop_grace, plan.rank).install()

    def run_eval(at_step: int) -> dict:
        engine.eval()
        result = evaluate(
            engine, val_windows, indices, plan.batch.micro, device, byte_lengths, plan.rank, plan.world_size
        )
        engine.train()
        watchdog.beat()
        log.write(
            {"step": at_step, **result, "samples": loader.consumed_samples},
            f"eval step {at_step} | val loss {result['val_loss']:.4f} | ppl {result['perplexity']:.2f} | "
            f"bits/byte {result['bits_per_byte']:.4f}",
        )
        if not math.isfinite(result["val_loss"]):
            raise TrainingAborted(
                f"the validation loss is non-finite at step {at_step}: the weights diverged; stopped "
                f"without saving. Last healthy checkpoint: {_last_healthy(plan)}. Lower --lr, or "
                "check the data, and resume from that checkpoint with --resume PATH"
            )
        return result

    def save(at_step: int) -> Path:
        if not parameters_finite(engine, device):
            raise TrainingAborted(
                f"parameters are non-finite at step {at_step}: the run diverged; no checkpoint "
                f"written. Last healthy checkpoint: {_last_healthy(plan)}. Lower --lr, or check the "
                "data, and resume from that checkpoint with --resume PATH"
            )
        path = save_checkpoint(
            plan, engine, loader, at_step, counters, lineage, result["val_loss"] if result is not None else None
        )
        watchdog.beat()
        return path

    engine.train()
    batches = TimedBatches(iter(loader))
    window_loss = torch.zeros((), device=device)
    window_steps, window_start, run_start, start_step = 0, time.perf_counter(), time.perf_counter(), step
    window_first_step = step
    last_saved = plan.resume_from
    result = None
    while step < config.max_steps:
        loss, applied = train_step(plan, engine, batches, device)
        step += 1
        watchdog.arm()  # from the first finished step on: before it, JIT builds and compilation may take long
        if applied:
            counters["nonfinite_in_a_row"] = 0
            window_loss += loss
            window_steps += 1
        else:  # rare: only now does the host read the loss (every rank skipped, so every rank is here)
            finite = torch.isfinite(loss).to(torch.float32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            finite = bool(finite.item())
            counters["skipped_steps"] += 1
            counters["nonfinite_in_a_row"] = 0 if finite else counters["nonfinite_in_a_row"] + 1
            _log(
                plan,
                f"step {step}: {'non-finite loss' if not finite else 'overflow'}, update skipped "
                f"({counters['nonfinite_in_a_row']} in a row)",
            )
            if counters["nonfinite_in_a_row"] >= config.max_nonfinite_steps:
                raise TrainingAborted(
                    f"{counters['nonfinite_in_a_row']} non-finite losses in a row at step {step}; stopped without "
                    f"saving. Last healthy checkpoint: {_last_healthy(plan)}. Lower --lr, check the data, "
                    "or raise --max-nonfinite-steps"
                )
        if step % config.log_interval == 0 or step == config.max_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_second = tokens_per_step * (step - window_first_step) / max(elapsed, 1e-9)
            dist.all_reduce(window_loss, op=dist.ReduceOp.SUM)  # the global batch's loss, not rank 0's share
            eta = (time.perf_counter() - run_start) / max(1, step - start_step) * (config.max_steps - step)
            record = {
                "step": step,
                "lr": engine.get_lr()[0],
                "tokens": step * tokens_per_step,
                "samples": loader.consumed_samples,
                "tokens_per_second": tokens_per_second,
                "mfu": mfu(tokens_per_second, flops, peak, plan.world_size),
                "memory_gib": memory_gib(),
                "skipped_steps": counters["skipped_steps"],
                "data_wait_fraction": batches.seconds / max(elapsed, 1e-9),
            }  # > a few %: raise --loader-workers
            if window_steps:
                record["loss"] = (window_loss / window_steps / plan.world_size).item()
            else:  # every step of the window was skipped: there is no loss to report (not 0.0)
                record["skipped"] = True
            log.write(
                record,
                format_step(
                    step,
                    config.max_steps,
                    record.get("loss"),
                    record["lr"],
                    tokens_per_second,
                    record["mfu"],
                    record["memory_gib"],
                    eta,
                ),
            )
            window_loss.zero_()
            batches.seconds = 0.0
            window_steps, window_start, window_first_step = 0, time.perf_counter(), step
        if step % config.eval_interval == 0 or step == config.max_steps:
            result = run_eval(step)
        saved_now = False
        if (step % config.save_interval == 0 or step == config.max_steps) and counters["nonfinite_in_a_row"] == 0:
            last_saved, saved_now = save(step), True  # never mid non-finite streak
        watchdog.beat()
        if stop.agree(group):
            if counters["nonfinite_in_a_row"] == 0 and not saved_now:
                last_saved = save(step)
            saved = f"checkpoint {last_saved}" if last_saved is not None else "no checkpoint (none is healthy yet)"
            raise RunStopped(
                f"stopped by {stop.signal_name} at step {step}; {saved}; run the same command "
                "(--resume auto) to continue"
            )
    watchdog.disarm()
    stop.uninstall()
    if result is None:  # resumed at max_steps: nothing to train, still report
        result = run_eval(step)
    if plan.rank == 0 and last_saved is not None:
        consolidate(plan, last_saved)
    dist.barrier()
    summary = {"step": step, **result}
    if plan.rank == 0:
        print(
            f"final validation loss {result['val_loss']:.4f} | perplexity {result['perplexity']:.2f} | "
            f"bits/byte {result['bits_per_byte']:.4f} | weights {Path(config.out) / WEIGHTS_FILE}",
            flush=True,
        )
        if config.sample_tokens > 0:
            print("sample:\n" + _sample_text(plan, device), flush=True)
    log.close()
    teardown(engine)
    if lock is not None:
        lock.release()
    return summary


def teardown(engine) -> None:
    """Barrier, engine and process group down in that order: without it 2-rank jobs sometimes abort at exit."""
    import torch.distributed as dist

    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    """`deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json [options]` (or plain `python`)."""
    from dsllm.train_config import parse_train_args

    rank = world_from_env()[0]
    started = False
    try:
        plan = preflight(parse_train_args(argv))
        started = True
        train(plan)
    except RunStopped as err:
        if rank == 0:
            sys.stderr.write(f"{err}\n")
        _quiet_teardown()
        return STOPPED_EXIT
    except (UserError, TrainingAborted) as err:
        # pre-flight faults are the same on every rank: rank 0 says it; later ones are said by the ranks that saw them
        if not started and rank == 0 or started and _first_to_report(str(err)):
            prefix = f"rank {rank}: " if started and world_from_env()[2] > 1 and rank != 0 else ""
            sys.stderr.write(f"error: {prefix}{err}\n")
        return _exit_now(2 if isinstance(err, UserError) else 3)
    except KeyboardInterrupt:
        if rank == 0:
            sys.stderr.write(
                "interrupted outside the training loop; checkpoints already written are kept "
                "(--resume auto continues from the newest)\n"
            )
        return 130
    except RuntimeError as err:
        if not _peer_failure(err):
            raise
        first = str(err).strip().splitlines()[0][:300]
        if not _reported_on_this_host():  # a rank that exited on a fault of its own has said why: no second line
            sys.stderr.write(
                f"error: rank {rank}: a collective failed because another rank died, hung past "
                f"--collective-timeout or lost the network ({first}); the launcher's log names the rank "
                "that exited first. Resume with --resume auto (or run under launch/supervise.py)\n"
            )
        time.sleep(2)  # DeepSpeed's launcher polls every second: let it see, and name, the rank that failed first
        kill_local_peers()
        return _exit_now(4)
    return 0


def _exit_now(code: int) -> int:
    """With a process group up, a rank that leaves on a fault must not wait for its peers (they may be stuck in a
    collective) nor run gloo's destructors, which abort ('terminate called without an active exception', exit
    250 instead of this code): flush and exit at once. Without one, return the code."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _quiet_teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _error_folder() -> Path:
    """Where the ranks of one job on this host mark the faults they reported (they share a launcher)."""
    import tempfile

    job = f"{os.getuid()}-{os.getppid()}-{os.environ.get('MASTER_PORT', '')}"
    return Path(tempfile.gettempdir()) / f"dsllm-errors-{job}"


def _first_to_report(message: str) -> bool:
    """Whether this rank is the first of its host to report this message (ranks that all hit the same fault
    print it once). A marker file per message in `_error_folder()`."""
    import hashlib

    if world_from_env()[2] == 1:
        return True
    folder = _error_folder()
    folder.mkdir(exist_ok=True)
    try:
        os.close(
            os.open(folder / hashlib.sha256(message.encode()).hexdigest()[:16], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        )
        return True
    except FileExistsError:
        return False


def _reported_on_this_host() -> bool:
    return world_from_env()[2] > 1 and _error_folder().is_dir() and any(_error_folder().iterdir())


def _peer_failure(err: RuntimeError) -> bool:
    import torch.distributed as dist

    markers = (
        "connection closed by peer",
        "connection reset by peer",
        "broken pipe",
        "timed out",
        "timeout",
        "nccl communicator was aborted",
    )  # gloo says "Timed out waiting 15000ms for recv operation"
    return isinstance(err, getattr(dist, "DistError", ())) or any(m in str(err).lower() for m in markers)
