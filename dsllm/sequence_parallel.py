"""Sequence parallelism (DeepSpeed-Ulysses): each window split along its length over `--sequence-parallel N` ranks.

Every rank of a sequence group reads the same windows, and only its piece of each (`TokenWindows`' `piece`): the
embeddings, norms, MLPs and the head see T/N tokens. Attention needs the whole window, so DeepSpeed's
`DistributedAttention` swaps the layout around it with two all-to-alls: [B, T/N, H, D] (a piece of the sequence,
every head) becomes [B, T, H/N, D] (the whole sequence, a share of the heads), attention runs, and the output goes
back. RoPE is applied before the exchange, with the piece's own positions (`SequenceSplit.positions`).

The groups are DeepSpeed's own (`deepspeed.runtime.sequence_parallel.parallel_state_sp`, consecutive ranks form a
sequence group): handed to `deepspeed.initialize` as the mpu, they make ZeRO shard over every rank and average the
gradients over the data-parallel replicas only. So the loss a rank backpropagates must be its share of the window's
mean (its tokens' summed loss over all the window's tokens), the summed gradients of a group being those of the whole
window (`SequenceSplit.whole_mean`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from dsllm.errors import UserError

if TYPE_CHECKING:  # (no torch at pre-flight: --help and the checks stay fast)
    import torch

    from dsllm.model_config import ModelConfig


def check_sequence_parallel(
    model: ModelConfig,
    world_size: int,
    size: int,
    seq_len: int,
    *,
    stages: int,
    tensor: int,
    zero_stage: int,
    document_mask: bool,
    seq_len_warmup: int,
    compile_: bool,
) -> None:
    """A sequence-parallel layout that cannot run is one line before any rank starts."""
    if size == 1:
        return
    flag = f"--sequence-parallel {size}"
    others = [
        (stages > 1, f"--pipeline-parallel {stages}"),
        (tensor > 1, f"--tensor-parallel {tensor}"),
        (bool(model.moe_experts), f"--model.moe_experts {model.moe_experts}"),
        (document_mask, "--document-mask"),
        (bool(seq_len_warmup), f"--seq-len-warmup {seq_len_warmup}"),
        (compile_, "--compile"),
    ]
    for present, other in others:
        if present:
            raise UserError(f"{flag} with {other}: not supported yet; drop one of them")
    if zero_stage == 3:
        raise UserError(
            f"{flag} with ZeRO-3: not supported yet (DeepSpeed 0.19.8's stage 3 divides a sequence group's gradients "
            "by its ranks once too often: half the gradient norm at 2, so clipping goes wrong); use "
            "ds_configs/zero1.json or zero2.json"
        )
    if world_size % size:
        raise UserError(
            f"{flag}: the {world_size} rank(s) do not divide into sequence groups of {size}; launch a multiple of "
            f"{size} ranks (deepspeed --num_gpus N) or change --sequence-parallel"
        )
    if model.kv_heads % size:
        what = "model.n_heads" if model.kv_heads == model.n_heads else "model.n_kv_heads"
        raise UserError(
            f"{flag}: {what} = {model.kv_heads} is not divisible by {size}, so the attention heads cannot be shared "
            f"out evenly (Ulysses gives each rank whole heads); use a --sequence-parallel that divides {model.kv_heads}"
        )
    if seq_len % size:
        raise UserError(
            f"{flag}: --seq-len {seq_len} is not divisible by {size}; use a --seq-len that is a multiple of {size}"
        )
    if model.dropout:
        raise UserError(
            f"{flag} with --model.dropout {model.dropout}: the ranks of a sequence group would draw the same dropout "
            "masks for different tokens and heads (no per-rank RNG streams yet); pretrain with dropout 0"
        )


@functools.cache
def sequence_mesh(size: int):
    """DeepSpeed's sequence x data-parallel groups (consecutive ranks share a window), made once per process: the
    mpu of a sequence-parallel engine."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(size)
    return parallel_state_sp


@dataclasses.dataclass(frozen=True)
class SequenceSplit:
    """This rank's piece of every window: piece `rank` of `size`, exchanged over `group` (DeepSpeed's)."""

    rank: int
    size: int
    group: object

    @classmethod
    def of(cls, size: int) -> SequenceSplit:
        mesh = sequence_mesh(size)
        return cls(mesh.get_sequence_parallel_rank(), size, mesh.get_sequence_parallel_group())

    def piece(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's piece of `tensor`'s sequence dimension (1)."""
        length = tensor.shape[1] // self.size
        return tensor[:, self.rank * length : (self.rank + 1) * length]

    def positions(self, inputs: torch.Tensor) -> torch.Tensor:
        """The positions of a piece's tokens in their window, [B, T/N]."""
        import torch

        batch, length = inputs.shape
        return (torch.arange(length, device=inputs.device) + self.rank * length).expand(batch, length)

    def whole_mean(self, local: torch.Tensor) -> torch.Tensor:
        """From the mean loss of this rank's piece: a loss whose value is the whole window's mean (every rank the
        same, for the log) and whose gradient is this rank's share of it, local / N (DeepSpeed sums the gradients of
        a sequence group and averages over the data-parallel replicas only)."""
        import torch.distributed as dist

        whole = local.detach().clone()
        dist.all_reduce(whole, group=self.group)
        whole /= self.size
        share = local / self.size
        return share + (whole - share.detach())

    def window_loss(self, module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Pretraining's loss (`dsllm.engine.window_loss`) of a micro batch of this rank's pieces of the windows
        (T/N + 1 tokens each: the piece's inputs and their next tokens)."""
        batch = batch.to(device, non_blocking=True)
        inputs = batch[:, :-1]
        return self.whole_mean(module(inputs, batch[:, 1:], positions=self.positions(inputs))[1])

    def score(self, module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[None, torch.Tensor]:
        """(None, the whole windows' mean loss) on every rank of the group, for `dsllm.scoring.evaluate`, from whole
        windows: each rank scores its piece."""
        piece = self.piece(inputs)
        return None, self.whole_mean(module(piece, self.piece(targets), positions=self.positions(piece))[1])
