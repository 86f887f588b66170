"""How a run saves, chooses, verifies and loads its training checkpoints (`Checkpointer`).

Before the process group exists, `choose()` picks the checkpoint to resume from (cheap checks: marker,
files present with their sizes, the same model and precision) and whether it must go through DeepSpeed's
universal checkpoint (another world size or ZeRO stage). After it, `verify()` has the ranks hash the
files against the marker, each rank a share, falling back to an older checkpoint of the lineage when one
is damaged. `save()` writes into a staging folder and commits it; `load()` restores engine, data
position and RNG. The loop asks `should_save(step, last_step)`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from dsllm.checkpoint.states import load_rng, require_model_states, save_rng
from dsllm.checkpoint.store import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    Marker,
    checkpoint_files,
    checksum_problem,
    commit,
    continues_branch,
    current_branch,
    file_digests,
    lineage_candidates,
    prune,
    remove_leftovers,
    resume_candidates,
    size_problem,
    staging_dir,
    start_branch,
    tag_for,
)
from dsllm.errors import USER_ERROR_EXIT, UserError
from dsllm.run_spec import RunSpec


class Checkpointer:
    """The training checkpoints of one run folder, for one run spec. `kind` names what trains ("pretrain" or
    "finetune"); `train_fingerprint` identifies the training data (a resumed run must see the same)."""

    def __init__(
        self,
        run_dir: Path,
        spec: RunSpec,
        *,
        interval: int,
        keep: int,
        resume: str,
        train_fingerprint: str,
        kind: str = "pretrain",
    ):
        self.run_dir, self.checkpoints = Path(run_dir), Path(run_dir) / CHECKPOINTS_DIR
        self.spec, self.interval, self.keep, self.resume = spec, interval, keep, resume
        self.train_fingerprint, self.kind = train_fingerprint, kind
        self.resume_from: Path | None = None
        self.universal = False  # resume through a universal checkpoint (world size, ZeRO stage or layout changed)
        self.renamed: str | None = None  # "gpt" / "pipeline": its parameters renamed for the other kind of model
        self.fallbacks: list[Path] = []  # older checkpoints of the lineage, when resume_from turns out damaged
        self.branch: str | None = None
        self.previous: str | None = None
        self.last_saved: Path | None = None

    @classmethod
    def for_run(cls, config, spec: RunSpec, train_fingerprint: str, kind: str = "pretrain") -> Checkpointer:
        """The checkpoints of a run's --out, as its options (a RunConfig) say, with the resume point chosen."""
        checkpointer = cls(
            Path(config.out),
            spec,
            interval=config.save_interval,
            keep=config.keep_checkpoints,
            resume=config.resume,
            train_fingerprint=train_fingerprint,
            kind=kind,
        )
        checkpointer.choose()
        return checkpointer

    # -- before the process group ---------------------------------------------------------------------------
    def choose(self) -> Path | None:
        """Pick the checkpoint to resume from (None: a fresh start) by the cheap checks; see module docstring."""
        candidates, explicit = resume_candidates(self.resume, self.run_dir)
        self._choose(candidates, explicit, size_problem)
        self.last_saved = self.resume_from
        return self.resume_from

    def _choose(self, candidates: list[Path], explicit: bool, problem_of) -> None:
        for i, path in enumerate(candidates):
            marker = Marker.read(path)
            problem = "its marker is unreadable" if marker is None else problem_of(path, marker)
            if problem is None:
                self.resume_from, self.fallbacks = path, candidates[i + 1 :]
                self.universal = self._needs_universal(marker, path)
                pipelines = (marker.pipeline_stages > 1, self.spec.pipeline_stages > 1)
                self.renamed = None if pipelines[0] == pipelines[1] else "pipeline" if pipelines[1] else "gpt"
                return
            if explicit:
                raise UserError(f"{path}: damaged checkpoint ({problem}); resume from another one with --resume PATH")
            _say(self.spec, f"checkpoint {path} is damaged ({problem}); falling back to the one before it")
        self.resume_from, self.universal, self.fallbacks = None, False, []
        if candidates:
            raise UserError(
                f"{self.checkpoints}: every checkpoint of this run is damaged; start again with --resume none and "
                "a new --out, or pass a checkpoint with --resume PATH"
            )

    def _needs_universal(self, marker: Marker, checkpoint: Path) -> bool:
        """Whether resuming needs DeepSpeed's universal checkpoint (another world size or ZeRO stage);
        combinations DeepSpeed cannot load are refused here with what to do instead."""
        spec = self.spec
        model = spec.model.to_dict()
        if marker.kind != self.kind:
            raise UserError(
                f"{checkpoint}: a {marker.kind} checkpoint, this is a {self.kind} run; use another --out, "
                "or start from its weights (--init)"
            )
        if marker.model != model:
            changed = sorted(k for k in marker.model if marker.model[k] != model.get(k))
            raise UserError(
                f"{checkpoint}: saved from a model that differs in {', '.join(changed)}; resume with the "
                "same --model options, or start a new run with another --out"
            )
        if marker.precision != spec.precision:
            raise UserError(
                f"{checkpoint}: saved in {marker.precision}, this run would train in {spec.precision}; "
                f"pass --precision {marker.precision} to resume it"
            )
        saved_world, saved_stage, stage = marker.world_size, marker.zero_stage, spec.zero_stage
        experts = (marker.world_size, marker.expert_parallel, marker.zero_stage)
        if marker.model.get("moe_experts") and experts != (spec.world.size, spec.expert_parallel, spec.zero_stage):
            raise UserError(
                f"{checkpoint}: a Mixture-of-Experts checkpoint of {experts[0]} rank(s), --expert-parallel "
                f"{experts[1]}, ZeRO-{experts[2]}; resume it with the same (experts on another layout are not "
                "supported yet)"
            )
        # universal: AutoTP shards merged and re-split, a pipeline's layers re-partitioned (their names do not
        # depend on the stage count; to and from no pipeline they are renamed)
        saved_layout, layout = (
            (marker.tensor_parallel, marker.pipeline_stages),
            (spec.tensor_parallel, spec.pipeline_stages),
        )
        if saved_layout != layout and 0 in (saved_stage, stage):
            raise UserError(
                f"{checkpoint}: saved with --tensor-parallel {saved_layout[0]} --pipeline-parallel {saved_layout[1]}, "
                f"this run has {layout[0]} and {layout[1]}; a new layout goes through DeepSpeed's universal "
                "checkpoint, which needs ZeRO 1-3 on both sides: resume with the same layout, or with "
                "ds_configs/zero1.json"
            )
        if saved_layout == layout and saved_stage == stage and (saved_world == spec.world.size or stage == 0):
            return False  # ZeRO-0 keeps whole optimizer state on every rank: it loads on any world size
        if 0 in (saved_stage, stage):
            raise UserError(
                f"{checkpoint}: saved with ZeRO stage {saved_stage}, this run has stage {stage}; DeepSpeed's "
                "universal checkpoint converts only between stages 1-3: resume with ZeRO-"
                f"{saved_stage} (--ds_config ds_configs/zero{saved_stage}.json)"
            )
        if 1 < max(marker.sequence_parallel, spec.sequence_parallel):
            raise UserError(
                f"{checkpoint}: saved by {saved_world} rank(s) with ZeRO-{saved_stage} and --sequence-parallel "
                f"{marker.sequence_parallel}; with sequence parallelism a checkpoint resumes on the same number of "
                "ranks and ZeRO stage only (DeepSpeed 0.19.8 records its sequence groups as tensor parallelism, which "
                "its universal conversion then fails on); or start a new run from its weights with --init and a new "
                "--out"
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

    # -- after the process group ----------------------------------------------------------------------------
    def verify(self) -> None:
        """Check the chosen checkpoint's files against the sha256 sums in its marker, each rank hashing a share;
        a damaged one (auto resume) gives way to the one before it, with a line saying why."""
        import torch.distributed as dist

        world = self.spec.world
        while self.resume_from is not None:
            marker = Marker.read(self.resume_from)
            names = sorted(marker.files) if isinstance(marker.files, dict) else []
            verdicts = [None] * world.size
            share = names[world.rank :: world.size]
            dist.all_gather_object(verdicts, checksum_problem(self.resume_from, marker, share))
            problem = next((v for v in verdicts if v), None)
            if problem is None:
                break
            explicit = self.resume not in ("auto", "none")
            self._choose(
                [self.resume_from, *self.fallbacks],
                explicit,
                lambda path, m, bad=self.resume_from, why=problem: why if path == bad else size_problem(path, m),
            )
        self.last_saved = self.resume_from

    def start_lineage(self) -> None:
        """Rank 0 records which branch this run continues (or starts, after a rollback); every rank learns it."""
        import torch.distributed as dist

        decision = [None]
        if self.spec.world.is_main:
            remove_leftovers(self.checkpoints)
            if continues_branch(self.checkpoints, self.resume_from):
                branch = current_branch(self.checkpoints)
            else:
                rollback = self.resume_from is not None and current_branch(self.checkpoints) is not None
                branch = start_branch(self.checkpoints, self.resume_from)
                if rollback:
                    _say(
                        self.spec,
                        f"resuming from {self.resume_from.name} starts a new branch of the run: --resume auto "
                        "follows it from now on, not the newer checkpoints it leaves behind",
                    )
            decision = [(branch, self.resume_from.name if self.resume_from else None)]
        dist.broadcast_object_list(decision, src=0)
        self.branch, self.previous = decision[0]

    def should_save(self, step: int, last_step: bool) -> bool:
        return step % self.interval == 0 or last_step

    def save(
        self, engine, step: int, *, data_state: dict, consumed_samples: int, counters: dict, val_loss: float | None
    ) -> Path:
        """Write a checkpoint into a staging folder on every rank, hash its files (each rank a share), and let
        rank 0 put the marker in and rename it into place. Returns the checkpoint folder."""
        import torch.distributed as dist

        world = self.spec.world
        staging = staging_dir(self.checkpoints, step)
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # the same save of an earlier attempt that died
        dist.barrier()
        state = {"dsllm": {"step": step, "data": data_state, "counters": dict(counters)}}
        engine.ds.save_checkpoint(str(self.checkpoints), tag=staging.name, client_state=state, save_latest=False)
        save_rng(staging, world.rank)
        if os.environ.get("DSLLM_FAULT") in (f"kill_in_save:{step}", f"kill_in_save:{step}:written"):  # test hook
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
        names = [checkpoint_files(staging) if world.is_main else None]
        dist.broadcast_object_list(names, src=0)
        shares = [None] * world.size
        dist.all_gather_object(shares, file_digests(staging, names[0][world.rank :: world.size]))
        if world.is_main:  # the marker goes in last, then one rename: the folder is complete or absent
            spec = self.spec
            marker = Marker(
                step=step,
                consumed_samples=consumed_samples,
                world_size=world.size,
                zero_stage=spec.zero_stage,
                precision=spec.precision,
                model=spec.model.to_dict(),
                train_fingerprint=self.train_fingerprint,
                branch=self.branch,
                previous=self.previous,
                val_loss=val_loss,
                files={k: v for share in shares for k, v in share.items()},
                kind=self.kind,
                pipeline_stages=spec.pipeline_stages,
                tensor_parallel=spec.tensor_parallel,
                expert_parallel=spec.expert_parallel,
                sequence_parallel=spec.sequence_parallel,
            )
            commit(staging, marker)
            prune(self.checkpoints, self.keep)
        dist.barrier()
        self.previous = tag_for(step)
        self.last_saved = self.checkpoints / tag_for(step)
        return self.last_saved

    def load(self, engine) -> dict:
        """Restore the engine (weights, optimizer, schedule) and this rank's RNG from the chosen checkpoint;
        returns what the run saved with it ({"step", "data", "counters"})."""
        import torch.distributed as dist

        from dsllm.safe_load import weights_only_loads

        path = self.resume_from
        if self.universal:
            if self.spec.world.is_main:
                path = convert_to_universal(self.resume_from)
                if self.renamed:
                    path = renamed_universal(self.resume_from, self.renamed, self.spec.model)
            dist.barrier()
            path = universal_dir(self.resume_from, self.renamed or "")
        if not self.universal:  # (the universal folder is ours, converted just now)
            require_model_states(path, self.spec.zero_stage, self.spec.world.rank)
        try:
            with weights_only_loads():  # a crafted file is refused, never run
                _, client = engine.ds.load_checkpoint(
                    str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        except (OSError, RuntimeError, KeyError, AssertionError) as err:  # damaged or foreign checkpoint files
            detail = (str(err).strip().splitlines() or ["no message"])[0][:200]
            raise UserError(
                f"{path}: DeepSpeed could not load this checkpoint ({type(err).__name__}: {detail}); "
                "resume from another one with --resume PATH"
            ) from None
        if client is None or not isinstance(client.get("dsllm"), dict):
            raise UserError(
                f"{path}: DeepSpeed could not load this checkpoint; resume from another one with --resume PATH"
            )
        if not self.universal:  # on another world size the per-rank streams do not map
            load_rng(path, self.spec.world.rank)
        replay_cpu_adam_clock(engine.ds)
        return client["dsllm"]

    def last_healthy(self) -> str:
        """The newest complete checkpoint of the lineage, for messages ("none" when there is none)."""
        done = lineage_candidates(self.checkpoints)
        return str(done[0]) if done else "none"


def replay_cpu_adam_clock(ds_engine) -> None:
    """Give DeepSpeed's CPU Adam kernels, after a resume, the beta^t a process that ran every step has.

    Those kernels (FusedAdam on the CPU accelerator, DeepSpeedCPUAdam under optimizer offload; `cpu_adam.h`
    IncrementStep) keep beta^t in float32 inside the process: a step one past the last multiplies it by beta, any
    other step sets it to pow(beta, t). The first step of a resumed process sets it, and pow(beta, t) and the running
    product differ in the last bit for most t, so a resume at step 10, 11 or 20 drifted from the uninterrupted run by
    ~1e-7 relative within 2-15 steps (one at 3, 4 or 8 did not). Replaying the product over steps 1..t on one-element
    dummies (lr 0) makes it the uninterrupted run's. CUDA's kernels compute beta^t from the step: nothing to do."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    optimizer = getattr(ds_engine, "optimizer", None)
    while optimizer is not None and not isinstance(optimizer, (DeepSpeedCPUAdam, FusedAdam)):
        optimizer = getattr(optimizer, "optimizer", None)  # (the ZeRO or mixed-precision wrapper's own)
    cpu_fused = isinstance(optimizer, FusedAdam) and get_accelerator().device_name() == "cpu"
    if not (cpu_fused or isinstance(optimizer, DeepSpeedCPUAdam)):
        return
    steps = max((int(state.get("step", 0)) for state in optimizer.state.values()), default=0)
    group = optimizer.param_groups[0]
    (beta1, beta2), eps, bias_correction = group["betas"], group["eps"], group.get("bias_correction", True)
    p, g, m, v = (torch.zeros(1) for _ in range(4))
    for t in range(1, steps + 1):
        if cpu_fused:
            optimizer.multi_tensor_adam(
                2048 * 32, optimizer._dummy_overflow_buf, [[g], [p], [m], [v]], 0.0, beta1, beta2, eps, t,
                optimizer.adam_w_mode, int(bias_correction), 0.0,
            )  # fmt: skip
        else:
            update = optimizer.ds_opt_adam.adam_update
            update(optimizer.opt_id, t, 0.0, beta1, beta2, eps, 0.0, bias_correction, p, g, m, v)


def _say(spec: RunSpec, message: str) -> None:
    if spec.world.is_main:
        print(message, flush=True)


def universal_dir(checkpoint: Path, renamed: str = "") -> Path:
    return checkpoint.parent / (f"{checkpoint.name}-universal" + (f"-{renamed}" if renamed else ""))


def renamed_universal(checkpoint: Path, naming: str, model) -> Path:
    """The checkpoint's universal folder with its parameters named as `naming` ("gpt" or "pipeline") models name
    them (the parameters are the same, a pipeline's layers name them by layer index): hard links to the tensor
    files of convert_to_universal's folder, renamed once and cached next to it."""
    from dsllm.pipeline import gpt_name, pipeline_name

    target = universal_dir(checkpoint, naming)
    if (target / COMPLETE_MARKER).is_file():
        return target
    source, staging = universal_dir(checkpoint), target.with_name(target.name + ".partial")
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, copy_function=os.link)  # no tensor is copied
    for folder in sorted(p for p in (staging / "zero").iterdir() if p.is_dir()):
        if naming == "gpt":
            name = gpt_name(model.n_layers, folder.name)
        else:
            name = pipeline_name(model.n_layers, model.tie_embeddings, folder.name)
        if name is None:  # a tied head's leftover entry: the embedding's folder holds it
            shutil.rmtree(folder)
        elif name != folder.name:
            folder.rename(folder.with_name(name))
    os.replace(staging, target)
    return target


def convert_to_universal(checkpoint: Path) -> Path:
    """`ds_to_universal` once per checkpoint (rank 0), cached next to it; a marker says it is complete."""
    target = universal_dir(checkpoint)
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
