"""The options of a training run: one documented dataclass field each.

`RunConfig` holds what every run has (DeepSpeed JSON, run folder, schedule, batch, precision, intervals,
resume, time budget); `TrainConfig` (pretraining) and `FinetuneConfig` (supervised fine-tuning) add their
own. Each field's docstring is its `--help` line; each class checks its values in `__post_init__`, so a
config that exists is a valid one. `dsllm.cli_args` turns a class into a command line (with `--recipe`).
"""

from __future__ import annotations

import dataclasses
import math
import re

from dsllm.errors import UserError
from dsllm.schedule import DECAY_SHAPES, Schedule
from dsllm.schedule import resolve as resolve_schedule

PIPELINE_PARTITIONS = ("blocks", "uniform", "parameters")  # dsllm.pipeline.PARTITIONS maps them for DeepSpeed
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "muon", "lion")  # --optimizer; dsllm.ds_config fills the JSON's optimizer section for muon, lion
DEFAULT_MODEL = "tiny"  # pretraining's --model when neither it nor --init is given


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    ds_config: str
    """DeepSpeed JSON (ds_configs/*.json), passed to DeepSpeed as-is after its "auto" fields are filled"""
    out: str = "runs/default"
    """run folder: config.json, metrics.jsonl, checkpoints/, the final model"""
    max_steps: int = 300
    """optimizer steps to train for"""
    max_time: str | None = None
    """time budget from the process's start (90m, 2h, 1:30:00, 5400): past it, stop at a step boundary with a
    checkpoint and exit 0"""
    max_cpu_seconds: float | None = None
    """CPU-time budget of each rank's process (time.process_time: its threads, not loader workers; use
    --loader-workers 0 to count all): past it, stop at a step boundary with a checkpoint and exit 0"""
    seq_len: int | None = None
    """tokens per sample; default: the model's max_seq_len"""
    micro_batch_size: int | None = None
    """samples per rank per forward pass; fills train_micro_batch_size_per_gpu when "auto\""""
    grad_accum: int | None = None
    """micro batches per optimizer step; fills gradient_accumulation_steps when "auto\""""
    global_batch_size: int | None = None
    """samples per optimizer step over all ranks; fills train_batch_size when "auto\""""
    lr: float = 1e-3
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """the schedule's floor (where cosine and wsd's decay end), as a fraction of --lr"""
    warmup_steps: int | None = None
    """linear warmup steps; default: 5% of --max-steps"""
    schedule: str = "cosine"
    """learning-rate schedule: cosine (warmup, cosine down to --min-lr-ratio), wsd (warmup, stable at --lr, then a
    decay over the last --decay-fraction of the steps), or a .json/.yaml file of phases (dsllm/schedule.py)"""
    decay_fraction: float = 0.2
    """wsd: the share of --max-steps the decay takes, in (0, 1)"""
    decay_steps: int | None = None
    """wsd (and --decay-from): the decay's length in steps; default: --decay-fraction of the run"""
    decay_shape: str = "1-sqrt"
    """wsd: the decay's shape, linear, cosine or 1-sqrt (1 - sqrt of the decay's progress)"""
    weight_decay: float = 0.1
    """decoupled weight decay; never applied to norms, biases and embeddings"""
    embedding_lr_scale: float = 1.0
    """the token (and learned position) embeddings' learning rate, as a multiple of --lr"""
    head_lr_scale: float = 1.0
    """an untied LM head's learning rate (--model.tie_embeddings false), as a multiple of --lr"""
    embedding_weight_decay: float = 0.0
    """decoupled weight decay of the embeddings (0: none, as before)"""
    beta1: float = 0.9
    """AdamW beta1 (also Muon's AdamW half, and Lion's: Lion is usually run with 0.9 and 0.99)"""
    beta2: float = 0.95
    """AdamW beta2 (also Muon's AdamW half, and Lion's: Lion is usually run with 0.9 and 0.99)"""
    grad_clip: float = 1.0
    """global gradient-norm clipping (0: off)"""
    precision: str = "auto"
    """auto (bf16 on a GPU that has it, fp32 on CPU), bf16, fp16 or fp32: fills bf16/fp16.enabled"""
    eval_interval: int = 100
    """steps between evaluations (and one at the end)"""
    save_interval: int = 100
    """steps between checkpoints (and one at the end)"""
    keep_checkpoints: int = 3
    """newest complete checkpoints kept"""
    resume: str = "auto"
    """auto (newest healthy checkpoint of --out), none (fresh start), or a checkpoint or run folder"""
    seed: int = 1234
    """seed of the model's initialisation and the data order"""
    log_interval: int = 10
    """steps between log lines"""
    max_nonfinite_steps: int = 5
    """stop (exit 3) after this many non-finite losses in a row"""
    peak_tflops: float | None = None
    """the device's peak TFLOP/s for MFU; default: from the GPU table"""
    collective_timeout: float = 600.0
    """seconds a collective may wait for a hung rank before the job fails"""
    stop_grace: float = 120.0
    """seconds from SIGINT/SIGTERM/SIGUSR1 to the checkpoint; past it, exit without one"""
    compile: bool = False
    """torch.compile the model inside the engine (inductor; costs time on the first step)"""
    optimizer: str = "adamw"
    """adamw; muon (DeepSpeed's Muon on the 2-D matrices of the blocks, AdamW with --lr on embeddings, head, norms
    and biases; ZeRO-0/1/2; on ZeRO-1/2 pass --grad-clip 0: they clip Muon's orthogonalised update, not the gradient);
    lion (DeepSpeed's Lion: wants a 3-10x smaller --lr and --beta2 0.99). Fills the DeepSpeed JSON's optimizer
    section, so the JSON must have none (a JSON's own optimizer wins over adamw)"""
    muon_lr: float = 0.02
    """--optimizer muon: the learning rate of the Muon matrices (the schedule scales it as it scales --lr)"""
    muon_momentum: float = 0.95
    """--optimizer muon: Muon's momentum (Nesterov), in [0, 1)"""

    _AT_LEAST = {
        "max_steps": 1,
        "eval_interval": 1,
        "save_interval": 1,
        "log_interval": 1,
        "max_nonfinite_steps": 1,
        "keep_checkpoints": 1,
        "seed": 0,
        "seq_len": 1,
        "micro_batch_size": 1,
        "grad_accum": 1,
        "global_batch_size": 1,
        "warmup_steps": 0,
        "decay_steps": 1,
    }
    _ABOVE_ZERO = {
        "lr": "the peak learning rate",
        "peak_tflops": "the device's peak TFLOPS",
        "collective_timeout": "the timeout in seconds",
        "max_cpu_seconds": "the CPU-time budget in seconds",
        "embedding_lr_scale": "the embeddings' multiple of --lr",
        "head_lr_scale": "the LM head's multiple of --lr",
        "muon_lr": "the Muon learning rate",
    }

    def __post_init__(self) -> None:
        self.check()

    @property
    def warmup(self) -> int:
        """Warmup steps: --warmup-steps, or 5% of --max-steps (at least 1)."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20)

    @property
    def max_seconds(self) -> float | None:
        """--max-time in seconds, None when there is no budget."""
        return None if self.max_time is None else parse_duration(self.max_time)

    def check(self) -> None:
        """Every option in range, before any rank starts: one line naming the flag and what it takes."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{flag(field.name)} {value}: not a finite number; pass a number")
        for name, least in self._AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise UserError(f"{flag(name)} {value}: must be {least} or more")
        for name, what in self._ABOVE_ZERO.items():
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{flag(name)} {value}: {what} must be above 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio {self.min_lr_ratio}: the cosine floor is a fraction of --lr, in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{flag(name)} {getattr(self, name)}: must be in [0, 1), e.g. 0.9 and 0.95")
        for name in ("weight_decay", "grad_clip", "embedding_weight_decay"):
            if getattr(self, name) < 0:
                raise UserError(f"{flag(name)} {getattr(self, name)}: must be 0 or more (0: off)")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer}: use {', '.join(OPTIMIZERS[:-1])} or {OPTIMIZERS[-1]}")
        if not 0 <= self.muon_momentum < 1:
            raise UserError(f"--muon-momentum {self.muon_momentum}: must be in [0, 1), e.g. 0.95")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision}: use {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
        if self.warmup >= self.max_steps and self.max_steps > 1:
            raise UserError(
                f"--warmup-steps {self.warmup} is not below --max-steps {self.max_steps}; shorten the warmup"
            )
        self.max_seconds  # noqa: B018 -- parses --max-time, raising on a malformed one
        if not 0 < self.decay_fraction < 1:
            raise UserError(f"--decay-fraction {self.decay_fraction}: the decay's share of the steps is in (0, 1)")
        if self.decay_shape not in DECAY_SHAPES:
            raise UserError(f"--decay-shape {self.decay_shape}: use {', '.join(DECAY_SHAPES)}")
        if not getattr(self, "decay_from", None):  # (a cooldown branch's schedule comes from its checkpoint's run)
            self._check_decay_options_used()
            self.lr_schedule()  # refuses an unknown name, a bad phases file, a decay inside the warmup

    def _check_decay_options_used(self) -> None:
        """--decay-steps/-fraction/-shape shape wsd's decay (and a --decay-from branch's): with any other schedule
        they would change nothing, which a user who set them should hear."""
        if self.schedule == "wsd":
            return
        defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
        for name in ("decay_steps", "decay_fraction", "decay_shape"):
            if getattr(self, name) != defaults[name]:
                raise UserError(
                    f"{flag(name)} {getattr(self, name)}: only --schedule wsd (or a --decay-from branch) has a "
                    f"decay to shape; --schedule {self.schedule} takes its own, so drop the option or use wsd"
                )

    def lr_schedule(self) -> Schedule:
        """The phases of --schedule for this run's steps (dsllm.schedule)."""
        return resolve_schedule(
            self.schedule,
            warmup=self.warmup,
            max_steps=self.max_steps,
            min_lr_ratio=self.min_lr_ratio,
            decay_fraction=self.decay_fraction,
            decay_steps=self.decay_steps,
            decay_shape=self.decay_shape,
        )


@dataclasses.dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """Pretraining: a prepared token dataset and a model preset (or JSON, or a trained model's weights with --init)
    with --model.FIELD overrides."""

    data: str | None = None
    """prepared dataset folder (data_pipeline/prepare.py), or a weighted mixture of them: NAME=DIR:WEIGHT,... or a
    mixture file (.json/.yaml: sources, weights and a schedule); default: the embedded default corpus"""
    model: str | None = None
    """model preset name or JSON file (default: tiny, or with --init the --init model); change single fields with
    --model.FIELD VALUE"""
    init: str | None = None
    """a trained run, checkpoint or model folder whose weights the run starts from (its model; --model.FIELD may
    change only RoPE, max_seq_len, dropout, z_loss and recompute), with a fresh optimizer and schedule at step 0; a
    run with checkpoints of its own resumes them instead"""
    model_overrides: dict = dataclasses.field(default_factory=dict)
    """{field: value} from --model.FIELD VALUE"""
    eval_windows: int = 64
    """fixed validation windows scored at each evaluation (of each source, with a mixture)"""
    max_epochs_warning: float = 4.0
    """with a mixture: warn (once per source) when a source has been read more than this many times over"""
    loader_workers: int = 2
    """DataLoader worker processes per rank"""
    sample_tokens: int = 64
    """tokens generated from the validation text at the end (0: none)"""
    pipeline_parallel: int = 1
    """pipeline stages (DeepSpeed's PipelineModule, 1F1B schedule); the ranks / stages are data-parallel replicas"""
    tensor_parallel: int = 1
    """tensor-parallel ranks (DeepSpeed's AutoTP): each block's attention heads, MLP width and the vocabulary are
    split over this many consecutive ranks (keep them inside a node); the ranks / this are data-parallel replicas"""
    document_mask: bool = False
    """attention stays inside each document of a window (block-diagonal causal mask from the <|endoftext|> that
    starts every document; positions restart there), in training and in its validation"""
    seq_len_warmup: int = 0
    """steps over which the window length grows from --seq-len-start to --seq-len (0: off); the same tokens per step,
    each window cut into shorter ones; validation scores full windows"""
    seq_len_start: int | None = None
    """the warmup's first window length: --seq-len halved (/2, /4, ...); default: --seq-len / 8, at least 8 tokens"""
    batch_size_warmup: int = 0
    """steps over which the global batch grows from --batch-size-start to the run's (0: off): the same micro batch,
    fewer of them accumulated per step, start + floor((full - start) x step / steps) micro batches at step `step`"""
    batch_size_start: int | None = None
    """the warmup's first global batch in samples: a multiple of --micro-batch-size x data-parallel ranks below the
    global batch; default: one micro batch per data-parallel rank"""
    expert_parallel: int = 1
    """expert-parallel ranks (DeepSpeed's MoE ep_size): each sparse block's experts are split over this many
    consecutive data-parallel ranks, which send each other their tokens (all-to-all); divides --model.moe_experts"""
    sequence_parallel: int = 1
    """sequence-parallel ranks (DeepSpeed-Ulysses): each window is split along its length over this many consecutive
    ranks, which exchange heads for sequence around attention (all-to-all); divides the heads and --seq-len"""
    pipeline_partition: str = "blocks"
    """how the layers split over the stages: blocks (as many transformer blocks each), uniform (as many layers each,
    the LM head counting as one: lighter last stage), or parameters"""
    decay_from: str | None = None
    """a checkpoint (checkpoints/stepNNNNNNNN) of a wsd run's stable phase: a new run (--out) continues it (weights,
    optimizer, data position) with its schedule's decay starting there, over --decay-steps (default: --decay-fraction
    of the whole); --max-steps becomes the decay's end; the checkpoint's run folder is only read"""
    decay_in_budget: bool = False
    """--schedule wsd with a budget (--max-cpu-seconds, --max-time): the decay starts when the budget's last
    --decay-fraction begins, over the steps the rest of it holds at the measured rate, so the run ends cooled down
    inside it (or at --max-steps, whichever comes first); recorded in config.json, a resume follows it"""

    _AT_LEAST = {
        **RunConfig._AT_LEAST,
        "eval_windows": 1,
        "loader_workers": 0,
        "sample_tokens": 0,
        "pipeline_parallel": 1,
        "tensor_parallel": 1,
        "expert_parallel": 1,
        "sequence_parallel": 1,
        "seq_len_warmup": 0,
        "seq_len_start": 1,
        "batch_size_warmup": 0,
        "batch_size_start": 1,
    }
    _ABOVE_ZERO = {**RunConfig._ABOVE_ZERO, "max_epochs_warning": "the epochs a source is read before the warning"}

    def check(self) -> None:
        super().check()
        if self.pipeline_partition not in PIPELINE_PARTITIONS:
            raise UserError(f"--pipeline-partition {self.pipeline_partition}: use {', '.join(PIPELINE_PARTITIONS)}")
        if self.seq_len_warmup >= self.max_steps:
            raise UserError(
                f"--seq-len-warmup {self.seq_len_warmup} is not below --max-steps {self.max_steps}; shorten the warmup"
            )
        if self.batch_size_warmup >= self.max_steps:
            raise UserError(
                f"--batch-size-warmup {self.batch_size_warmup} is not below --max-steps {self.max_steps}; shorten the "
                "warmup"
            )
        if self.batch_size_start is not None and not self.batch_size_warmup:
            raise UserError(
                f"--batch-size-start {self.batch_size_start} without --batch-size-warmup: there is no warmup to start; "
                "pass --batch-size-warmup STEPS or drop --batch-size-start"
            )
        if self.decay_in_budget:
            self._check_decay_in_budget()
        if self.seq_len_start is not None and not self.seq_len_warmup:
            raise UserError(
                f"--seq-len-start {self.seq_len_start} without --seq-len-warmup: there is no warmup to start; pass "
                "--seq-len-warmup STEPS or drop --seq-len-start"
            )

    def _check_decay_in_budget(self) -> None:
        if self.schedule != "wsd":
            raise UserError(
                f"--decay-in-budget with --schedule {self.schedule}: only wsd has a decay to start on the budget; "
                "pass --schedule wsd"
            )
        if self.max_cpu_seconds is None and self.max_time is None:
            raise UserError(
                "--decay-in-budget without a budget: pass --max-cpu-seconds or --max-time (the decay takes its last "
                "--decay-fraction), or --no-decay-in-budget for a run of --max-steps"
            )
        if self.decay_from is not None:
            raise UserError(
                f"--decay-in-budget with --decay-from {self.decay_from}: the branch is the cooldown, over "
                "--decay-steps; drop one"
            )


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig(RunConfig):
    """Supervised fine-tuning of a pretrained model on JSONL conversations (dsllm.finetune)."""

    init: str
    """the pretrained run folder, checkpoint or model folder to start from"""
    data: str
    """training JSONL: {"prompt", "response"} or {"messages": [...]} per line"""
    val_data: str | None = None
    """validation JSONL; default: --val-fraction of --data"""
    val_fraction: float = 0.05
    """share of --data held out for validation when there is no --val-data, in [0, 1)"""
    eval_examples: int = 64
    """validation prompts answered greedily for exact match, before and after training"""
    max_steps: int = 200
    """optimizer steps to train for"""
    micro_batch_size: int | None = 8
    """packed rows per rank per forward pass; fills train_micro_batch_size_per_gpu when "auto\""""
    lr: float = 1e-4
    """peak learning rate"""
    weight_decay: float = 0.0
    """decoupled weight decay; never applied to norms, biases and embeddings"""
    eval_interval: int = 50
    """steps between validation-loss evaluations (and one at the end)"""

    _AT_LEAST = {**RunConfig._AT_LEAST, "eval_examples": 0}

    def check(self) -> None:
        super().check()
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")


@dataclasses.dataclass(kw_only=True)
class EpochRunConfig(RunConfig):
    """A fine-tuning counted in epochs over a file of examples, scored on held-out ones after each (classification,
    reward model, DPO: dsllm.tuning)."""

    init: str
    """the pretrained run folder, checkpoint or model folder (`dsllm import`'s too) to start from"""
    data: str
    """the training examples"""
    val_data: str | None = None
    """validation examples, as --data; default: --val-fraction of --data"""
    val_fraction: float = 0.1
    """share of --data held out for validation when there is no --val-data, in [0, 1)"""
    epochs: int = 3
    """passes over the training examples (--max-steps, when given, counts steps instead); the validation examples
    are scored before training and after each"""
    max_steps: int | None = None
    """optimizer steps to train for; default: --epochs passes over --data"""
    eval_interval: int | None = None
    """steps between validation scores; default: one epoch"""
    micro_batch_size: int | None = 16
    """examples per rank per forward pass; fills train_micro_batch_size_per_gpu when 'auto'"""
    lr: float = 1e-4
    """peak learning rate"""
    weight_decay: float = 0.0
    """decoupled weight decay; never applied to norms, biases and embeddings"""

    _AT_LEAST = {**RunConfig._AT_LEAST, "epochs": 1}

    def check(self) -> None:
        if self.max_steps is None or self.eval_interval is None:  # counted from the data in pre-flight (`resolved`)
            # the other values checked now, on a copy with stand-ins for those two (its __post_init__ checks it)
            dataclasses.replace(self, max_steps=self.max_steps or 1_000_000, eval_interval=self.eval_interval or 1)
            return
        super().check()
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")

    def resolved(self, steps_per_epoch: int) -> EpochRunConfig:
        """The options with --max-steps (--epochs of `steps_per_epoch`) and --eval-interval (an epoch) filled."""
        return dataclasses.replace(
            self,
            max_steps=self.max_steps or self.epochs * steps_per_epoch,
            eval_interval=self.eval_interval or steps_per_epoch,
        )


@dataclasses.dataclass(kw_only=True)
class ClassifyConfig(EpochRunConfig):
    """Classification fine-tuning of a pretrained or imported model: a head on the last token (dsllm.classify)."""

    data: str
    """training examples: CSV (a header row) or JSONL, with a text and a label column"""
    text_column: str = "text"
    """the column (CSV) or field (JSONL) holding each example's text"""
    label_column: str = "label"
    """the column or field holding each example's label (any text or number)"""
    labels: str | None = None
    """the label set, comma-separated, in the head's order; default: the training labels, sorted"""


@dataclasses.dataclass(kw_only=True)
class RewardConfig(EpochRunConfig):
    """A reward model: a scalar head on the last token, trained on preference pairs (dsllm.preference)."""

    data: str
    """training pairs, JSONL: {"prompt": str, "chosen": str, "rejected": str} a line"""
    micro_batch_size: int | None = 8
    """pairs per rank per forward pass (two rows each); fills train_micro_batch_size_per_gpu when 'auto'"""


@dataclasses.dataclass(kw_only=True)
class DPOConfig(RewardConfig):
    """Direct preference optimisation of a policy against its frozen starting point (dsllm.preference)."""

    beta: float = 0.1
    """DPO's beta: how far the policy may move from the reference (the implicit reward's scale)"""
    lr: float = 1e-5
    """peak learning rate"""

    _ABOVE_ZERO = {**RunConfig._ABOVE_ZERO, "beta": "DPO's beta"}


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--ds_config" if name == "ds_config" else "--" + name.replace("_", "-")


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """Seconds of `5400`, `90m`, `1h30m`, `2h`, `45s` or `1:30:00` (H:MM:SS, as Slurm writes it)."""
    value = str(text).strip().lower()
    seconds = None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif re.fullmatch(r"\d+(:\d{1,2}){1,2}", value):
        parts = [int(p) for p in value.split(":")]
        seconds = float(sum(p * 60**i for i, p in enumerate(reversed(parts))))
    elif value and (match := _DURATION.fullmatch(value)) and any(match.groups()):
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds is None or seconds <= 0:
        raise UserError(f"--max-time {text}: not a duration above 0; write e.g. 5400, 90m, 1h30m or 1:30:00")
    return seconds
