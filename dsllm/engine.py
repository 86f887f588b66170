"""The one training engine: process group, optimizer and schedule, `deepspeed.initialize`, and the step.

Pretraining, fine-tuning, the throughput benchmark and the profiler all train through `build_engine` and
`Engine.train_batch`; `new_model` builds a model the way the spec needs it (partitioned as it is built, on
ZeRO-3). What differs between them is the model they bring and `loss_of(module, batch)`, the function that
turns one micro batch into a loss.

Parallel layouts plug in here: data parallel (ZeRO 0-3), and pipelines (`--pipeline-parallel`), for which
`new_model` builds DeepSpeed's `PipelineModule` and `deepspeed.initialize` returns a `PipelineEngine`, whose own
`train_batch(data_iter)` runs the micro batches through the stages (1F1B); `Engine.train_batch` has the same
shape for that reason. Tensor parallelism is DeepSpeed's AutoTP, driven by the JSON's `tensor_parallel` section
(`dsllm.tensor_parallel`): `build_engine` passes AutoTP's data x tensor mesh as the mpu (`tensor_mesh`), or in 3D
hands AutoTP the pipeline grid's groups (`_fit_3d`). Sequence parallelism (DeepSpeed-Ulysses, `dsllm.sequence_parallel`)
hands DeepSpeed its sequence x data groups as the mpu the same way (`parallel_groups`); expert parallelism is
DeepSpeed's MoE layer, which makes its groups itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsllm import ops
from dsllm.optimizer import check_muon_tags, client_optimizer, muon_halves, optimizer_type, param_groups, tag_muon
from dsllm.run_spec import RunSpec, World
from dsllm.schedule import Schedule

if TYPE_CHECKING:
    from dsllm.model_dir import StoredWeights

LossOf = Callable[[Any, Any, torch.device], torch.Tensor]  # (module or engine, micro batch, device) -> loss


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT of a one-process run, or a test's job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(world: World, collective_timeout: float) -> torch.device:
    """The process group (NCCL on GPU, gloo on CPU) and this rank's device. A plain `python` run is a
    world of one."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and world.size == 1:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world.size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))  # ranks must not oversubscribe cores
    # NCCL: a failed or timed-out collective aborts the communicator (an exception) instead of hanging the rank
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    ops.announce_builds(_main_only(world), ops.INIT_OPS)  # every rank: it also points DeepSpeed at the venv's builds
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        distributed_port=int(os.environ.get("MASTER_PORT", 29500)),  # used by MPI discovery
        timeout=timedelta(seconds=collective_timeout),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    _unlink_shm_buffer()
    return torch.device("cpu")


def _main_only(world: World) -> Callable[[str], None]:
    return (lambda line: print(line, flush=True)) if world.is_main else (lambda line: None)


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


def new_model(spec: RunSpec, weights: StoredWeights | None = None) -> torch.nn.Module:
    """The run's GPT (after `init_distributed`; its weights' seed drawn from torch's global generator, or its
    values a trained model's `weights`: continued pretraining's --init, read where each layout sets a parameter's
    initial value, `dsllm.model.initial_value`), built as the
    layout needs it, so no rank ever holds the whole model (a 7B model on 8 ranks is a part of it on each, not 8
    copies), with the values of the whole model (each parameter's comes from the seed and its name). A pipeline:
    DeepSpeed's PipelineModule, each stage building only its own layers (dsllm.pipeline; with tensor parallelism
    too, only its shards of them). Tensor parallelism: each rank builds only its shards
    (dsllm.tensor_parallel.sharded_gpt). ZeRO-3: built inside `deepspeed.zero.Init`, which partitions each module's
    parameters as soon as that module is built; the model initialises its weights through `Module.apply`, which
    zero.Init gathers, runs on rank 0 and broadcasts."""
    from dsllm.model import GPT, init_seed

    seed = weights if weights is not None else init_seed()  # (drawn first, as GPT itself would)
    if spec.pipeline_stages > 1:  # (ZeRO-0/1 only: pre-flight refuses pipelines on ZeRO-2/3)
        from dsllm.pipeline import pipeline_module

        stages, partition = spec.pipeline_stages, spec.pipeline_partition
        section = spec.ds.get("tensor_parallel")
        return pipeline_module(spec.model, seed, stages, partition, spec.tensor_parallel, section)
    if spec.tensor_parallel > 1:  # (ZeRO-1/2 only: pre-flight refuses ZeRO-0/3 with tensor parallelism)
        from dsllm.tensor_parallel import TensorSplit, sharded_gpt

        split = TensorSplit(spec.ds["tensor_parallel"], tensor_mesh(spec).get_tensor_model_parallel_group())
        return sharded_gpt(spec.model, seed, split)
    sequence = None
    if spec.sequence_parallel > 1:
        from dsllm.sequence_parallel import SequenceSplit

        sequence = SequenceSplit.of(spec.sequence_parallel)
    if spec.zero_stage != 3:  # (sparse blocks: only on ZeRO-0/1/2)
        return GPT(spec.model, seed, spec.expert_parallel, spec.expert_rank, sequence)
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=spec.deepspeed_config(), mpu=parallel_groups(spec)):
        return GPT(spec.model, seed, sequence=sequence)


def parallel_groups(spec: RunSpec):
    """The mpu DeepSpeed gets for the layout (its groups beyond data parallelism): AutoTP's data x tensor mesh, the
    sequence x data groups of DeepSpeed-Ulysses, or None. (A pipeline's grid comes with its PipelineModule.)"""
    if spec.sequence_parallel > 1:
        from dsllm.sequence_parallel import sequence_mesh

        return sequence_mesh(spec.sequence_parallel)
    return tensor_mesh(spec)


def tensor_mesh(spec: RunSpec):
    """AutoTP's data x tensor mesh (DeepSpeed's `groups`, the mpu its engine would build later), or None without
    tensor parallelism. Built before the engine: DeepSpeed checks the batch against the data-parallel ranks of
    the mpu it is given, or against the whole world."""
    if spec.tensor_parallel == 1:
        return None
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=spec.tensor_parallel)
    return groups


def lr_factor(schedule: Schedule) -> Callable[[int], float]:
    """The schedule's factor of --lr per step, as the plain function LambdaLR takes: torch checkpoints a callable
    object's attributes with the scheduler and loads them back over the run's own, a function it leaves alone (a
    cooldown branch keeps its new phases when it loads its source's scheduler state)."""

    def factor(step: int) -> float:
        return schedule.factor(step)

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


class Engine:
    """DeepSpeed's engine and the step dsllm trains with. `ds` is DeepSpeed's engine itself (checkpoints,
    learning rate, monitor); `module` the model inside it."""

    def __init__(self, ds_engine, spec: RunSpec, device: torch.device, loss_of: LossOf):
        self.ds, self.device, self.loss_of = ds_engine, device, loss_of
        self.accumulation = spec.batch.accumulation
        self.world_size = spec.world.size
        self.pipeline = spec.pipeline_stages > 1
        self._shape_changed = False  # a pipeline scored batches of another shape since the last training batch
        self._check_finite_first = spec.zero_stage == 0 and spec.precision == "fp32" and not self.pipeline
        self.sequence = None  # sequence parallelism: each rank scores its piece of the windows
        if spec.sequence_parallel > 1:
            from dsllm.sequence_parallel import SequenceSplit

            self.sequence = SequenceSplit.of(spec.sequence_parallel)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def train_batch(self, batches: Iterator, accumulation: int | None = None) -> tuple[torch.Tensor, bool]:
        """One optimizer step over `accumulation` micro batches from `batches` (default: the run's): (mean loss, still
        on the device; whether the update was applied).

        A step's own `accumulation` (a batch-size warmup, dsllm.batch_warmup) becomes DeepSpeed's
        gradient_accumulation_steps (`set_train_batch_size`: `backward` divides the loss by it), and each micro
        batch's accumulation boundary is set explicitly: DeepSpeed's default, (micro_steps + 1) % accumulation == 0
        on a counter that runs over the whole run, puts it mid-step once the accumulation has changed. ZeRO-1/2
        reduce the gradients, and the step applies, at the boundary.

        It makes no host sync of its own: DeepSpeed's ZeRO, bf16 and fp16 optimizers already decide, on the
        host, whether the gradients are finite and skip the update if not, and `was_step_applied()` reads
        that decision. Only ZeRO-0 in fp32 has no such check: there the loss flag is read before the step.
        (The throughput benchmark times this very method.)"""
        engine = self.ds
        if self.pipeline:
            return self._pipeline_batch(batches)
        count = self.accumulation if accumulation is None else accumulation
        if accumulation is not None and accumulation != engine.gradient_accumulation_steps():
            engine.set_train_batch_size(engine.train_batch_size() // engine.gradient_accumulation_steps() * count)
            if engine.gradient_accumulation_steps() != count:  # (DeepSpeed divided by another data-parallel size)
                raise RuntimeError(f"DeepSpeed set {engine.gradient_accumulation_steps()} micro batches, not {count}")
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(count):
            if accumulation is not None:
                engine.set_gradient_accumulation_boundary(micro == count - 1)
            loss = self.loss_of(engine, next(batches), self.device)
            engine.backward(loss)
            loss_sum += loss.detach().float()
            if micro < count - 1:
                engine.step()  # DeepSpeed only accumulates here
        loss_sum /= count
        if self._check_finite_first:
            import torch.distributed as dist

            finite = torch.isfinite(loss_sum).to(torch.float32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # a NaN on any rank reaches every rank's gradients
            if not finite.item():
                with _skipped_update(engine.optimizer):
                    engine.step()
                return loss_sum, False
        engine.step()
        return loss_sum, engine.was_step_applied()

    def _pipeline_batch(self, batches: Iterator) -> tuple[torch.Tensor, bool]:
        """DeepSpeed's PipelineEngine runs the 1F1B schedule over `accumulation` micro batches: the first stage
        reads their inputs, the last their targets (windows [:, :-1] and [:, 1:]); the stages between read
        nothing, so they skip the same micro batches to keep every rank's loader at the same sample."""
        engine = self.ds
        if self._shape_changed:
            engine.reset_activation_shape()
            self._shape_changed = False
        if engine.is_first_stage() or engine.is_last_stage():
            loss = engine.train_batch(
                iter([(w[:, :-1], w[:, 1:]) for w in (next(batches) for _ in range(self.accumulation))])
            )
        else:
            for _ in range(self.accumulation):
                next(batches)
            loss = engine.train_batch(iter(()))
        return loss.to(self.device), engine.was_step_applied()

    def score(self, inputs: torch.Tensor, targets: torch.Tensor, **forward):
        """(logits, mean loss) of a batch for scoring (`dsllm.scoring.evaluate`); `forward`: GPT.forward's
        positions and mask (document masking). A pipeline gives (logits, None) on its last stage and (None, None)
        on the others: its eval schedule runs the batch through every stage. Sequence parallelism: (None, mean
        loss), each rank scoring its piece of the windows."""
        if self.sequence is not None:
            return self.sequence.score(self.ds, inputs, targets)
        if not self.pipeline:
            return self.ds(inputs, targets, **forward)
        engine = self.ds
        engine.reset_activation_shape()  # a scoring batch may be shorter than a training micro batch
        self._shape_changed = True
        engine.total_loss = None  # the eval schedule adds its outputs to the last training batch's loss otherwise
        feed = iter([(inputs, inputs)]) if engine.is_first_stage() or engine.is_last_stage() else None
        _, logits = engine.eval_batch(
            feed, return_logits=True, compute_loss=False, reduce_output=None, bcast_loss=False, num_micro_batches=1
        )
        return (logits if engine.is_last_stage() else None), None

    def parameters_finite(self) -> bool:
        """Whether every parameter is finite on every rank (ZeRO-3: each rank checks its partition)."""
        import torch.distributed as dist

        flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all().to(self.device) for p in self.module.parameters()]
        finite = torch.stack(flags).all().to(torch.float32) if flags else torch.ones((), device=self.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def teardown(self) -> None:
        """Engine, barrier and process group down in that order: without it 2-rank jobs sometimes abort at exit."""
        from dsllm.run_control import end_process_group

        self.ds.destroy()
        end_process_group()


def build_engine(
    spec: RunSpec,
    model: torch.nn.Module,
    device: torch.device,
    loss_of: LossOf,
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    schedule: Callable[[int], float],
    compile: bool = False,
    load_universal: bool = False,
    lr_groups: dict | None = None,
) -> Engine:
    """DeepSpeed's engine around `model`. The optimizer and scheduler are the JSON's when it names them,
    else torch's AdamW (decay on matrices only) and `schedule` (a factor of each group's lr per step). `lr_groups`:
    `param_groups`' embedding and head options (their lrs are scales of the optimizer's lr). A Muon section
    (--optimizer muon) gets its parameters tagged (`tag_muon`); a Lion section on CPU, DeepSpeed's CPU Lion
    (`client_optimizer`)."""
    import deepspeed

    ds = spec.deepspeed_config(load_universal)
    base_lr = ds.get("optimizer", {}).get("params", {}).get("lr", lr)  # a JSON's own lr is the optimizer's
    groups = param_groups(model, weight_decay, base_lr, **(lr_groups or {}))
    ops.announce_builds(_main_only(spec.world), ops.ops_for_config(ds, cpu_accelerator=device.type == "cpu"))
    optimizer = client_optimizer(ds, groups, device, lr, betas)
    lr_scheduler = None
    if "scheduler" not in ds:
        lr_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
    muon = optimizer_type(ds) == "muon"
    if muon:
        tag_muon(model)
        params = ds["optimizer"].get("params", {})
        groups = muon_halves(groups, params.get("lr", lr), params.get("muon_lr", params.get("lr", lr)))
    mpu = None
    if spec.tensor_parallel > 1 and spec.pipeline_stages > 1:
        # 3D: the pipeline's pipe x data x model grid holds the groups; AutoTP reads DeepSpeed's `groups`, which
        # would otherwise build a data x tensor mesh over the whole world (mixing the stages): hand it the grid's
        from deepspeed.utils import groups as ds_groups

        grid = model.mpu()
        ds_groups._TENSOR_MODEL_PARALLEL_GROUP = grid.get_slice_parallel_group()
        ds_groups._DATA_PARALLEL_GROUP = grid.get_data_parallel_group()
        ds_groups._MODEL_PARALLEL_GROUP = grid.get_model_parallel_group()  # stages x tensor ranks: the norm's
    else:
        mpu = parallel_groups(spec)
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # its scheduler warns about reading the lr before step 1
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds, mpu=mpu
        )
    finally:
        ds_logger.setLevel(level)
    if muon:
        check_muon_tags(model)
    if spec.tensor_parallel > 1 and spec.pipeline_stages > 1:
        _fit_3d(engine, model.mpu())
    if compile:  # compiled in place: parameter names and checkpoints stay those of the eager model
        engine.compile()
    return Engine(engine, spec, device, loss_of)


def _fit_3d(engine, grid) -> None:
    """What DeepSpeed 0.19.8's engine gets wrong when AutoTP splits a PipelineModule's stages (3D), set right after
    `deepspeed.initialize` from the pipeline's grid. AutoTP's set-up makes DeepSpeed's `groups` module the mpu, so
    (1) the pipeline schedule finds no pipe group: the mpu becomes the grid, with AutoTP's two tensor calls added;
    (2) checkpoint files were numbered by tensor rank, so the stages overwrote each other's optimizer files: they
    are numbered by the rank among a replica's stages x tensor ranks, and that many are expected on load; (3) each
    rank records the universal-checkpoint layout (which parameters are split how) of its own stage's layers only,
    and the converter reads rank 0's: every rank gets the union."""
    import functools

    import torch.distributed as dist
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    engine.mpu = _TensorPipelineGrid(grid)
    engine.checkpoint_mp_rank = grid.get_model_parallel_rank()
    engine.mp_world_size = grid.get_model_parallel_world_size()
    layouts = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, getattr(engine.module, UNIVERSAL_CHECKPOINT_INFO))
    setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, functools.reduce(_union, layouts))


def _union(a, b):
    """Two universal-checkpoint layouts as one: dicts key by key, lists without repeats."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {**b, **{key: _union(value, b[key]) if key in b else value for key, value in a.items()}}
    if isinstance(a, list) and isinstance(b, list):
        return a + [item for item in b if item not in a]
    return a


class _TensorPipelineGrid:
    """The mpu of a 3D engine: DeepSpeed's pipeline grid (what the pipeline schedule calls), plus the two
    tensor-parallel calls AutoTP's engine code makes on its mpu, answered from the grid's model axis."""

    def __init__(self, grid):
        self.grid = grid

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def get_tensor_model_parallel_group(self):
        return self.grid.get_slice_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        import torch.distributed as dist

        size = self.grid.get_slice_parallel_world_size()
        return dist.get_rank() // size * size  # the model axis is the fastest: a tensor group is consecutive


def apply_schedule(engine: Engine) -> None:
    """The optimizer's lr set from the run's schedule at the step its scheduler was loaded at: a checkpoint of another
    schedule (a --decay-from branch's source) restored the lr that schedule gave there, and its step, not its phases."""
    scheduler = engine.ds.lr_scheduler
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # (the JSON's scheduler)
        return
    step = scheduler.last_epoch
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


def engine_options(config, schedule: Schedule | None = None) -> dict[str, Any]:
    """build_engine's optimizer, schedule and compile arguments from a run's options (a RunConfig); `schedule`: the
    phases when they are not the options' own (a --decay-from branch)."""
    return {
        "lr": config.lr,
        "betas": (config.beta1, config.beta2),
        "weight_decay": config.weight_decay,
        "schedule": lr_factor(schedule or config.lr_schedule()),
        "compile": config.compile,
        "lr_groups": {
            "embedding_lr_scale": config.embedding_lr_scale,
            "head_lr_scale": config.head_lr_scale,
            "embedding_weight_decay": config.embedding_weight_decay,
        },
    }


def document_window_loss(eot: int) -> LossOf:
    """`window_loss` with attention kept inside each document of a window (`--document-mask`): positions and a
    block-diagonal causal mask from the <|endoftext|> (`eot`) that starts every document."""
    from dsllm.data.documents import document_layout

    def loss(module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        inputs = batch[:, :-1]
        return module(inputs, batch[:, 1:], **document_layout(inputs, eot))[1]

    return loss


def window_loss(module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pretraining's loss of a micro batch of windows (seq_len + 1 tokens each): next-token cross-entropy.
    [1]: the loss only. Holding the logits ([micro, T, vocab]) would keep them alive through the optimizer
    step, the peak of model-state memory: 64 MiB for `tiny` at micro 8 x 256, 800 MiB for GPT-2 at 8 x 1024."""
    batch = batch.to(device, non_blocking=True)
    return module(batch[:, :-1], batch[:, 1:])[1]
