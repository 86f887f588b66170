"""Throughput, MFU and memory, and the run's log: one readable line on stdout, one JSON object per
line in `metrics.jsonl`, and DeepSpeed's monitor (TensorBoard / CSV / W&B) when the JSON enables it.
Also the GPU table (memory and peak) that MFU and `python -m dsllm plan` share. No torch at import:
`plan --help` reads the table."""

from __future__ import annotations

import dataclasses
import json
import re
import resource
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class GPUKind:
    memory_gib: float  # total device memory as nvidia-smi / rocm-smi report it (MiB / 1024)
    peak_tflops: float  # dense bf16 tensor peak, no sparsity; GeForce: with fp32 accumulate, as training uses
    device_name: str  # the words of torch.cuda.get_device_name() that name it (all must appear)


# Peaks are the vendors' datasheet figures for dense bf16 (their "with sparsity" figures halved): NVIDIA A10, A40,
# L4, L40, L40S, A100, H100, H200 and HGX B200 datasheets; GeForce from the Ampere GA102, Ada and RTX Blackwell
# architecture whitepapers (bf16 with fp32 accumulate); AMD Instinct MI250X and MI300X datasheets. Memory is the
# total nvidia-smi / rocm-smi print (e.g. 81559 MiB for an H100 80GB, 183359 MiB for a B200). An MI250X is two
# devices (GCDs) to torch and DeepSpeed: its row is one GCD, so count GCDs.
GPU_KINDS = {
    "A10": GPUKind(22.5, 125.0, "A10"),
    "A40": GPUKind(45.0, 149.7, "A40"),
    "L4": GPUKind(22.5, 121.0, "L4"),
    "L40": GPUKind(45.0, 181.0, "L40"),
    "L40S": GPUKind(45.0, 362.0, "L40S"),
    "A100-40GB": GPUKind(40.0, 312.0, "A100 40GB"),
    "A100-80GB": GPUKind(80.0, 312.0, "A100"),  # names without a size: the same peak
    "H100-PCIe": GPUKind(79.6, 756.0, "H100 PCIe"),
    "H100-SXM": GPUKind(79.6, 989.0, "H100"),  # torch names it "NVIDIA H100 80GB HBM3"
    "H100-NVL": GPUKind(93.6, 835.0, "H100 NVL"),
    "H200": GPUKind(140.4, 989.0, "H200"),
    "H200-NVL": GPUKind(140.4, 835.0, "H200 NVL"),
    "B200": GPUKind(179.1, 2250.0, "B200"),
    "RTX3090": GPUKind(24.0, 71.0, "RTX 3090"),
    "RTX4090": GPUKind(24.0, 165.2, "RTX 4090"),
    "RTX5090": GPUKind(31.8, 209.5, "RTX 5090"),
    "MI250X": GPUKind(64.0, 191.5, "MI250X"),  # one GCD: half of the 383 TFLOPS, 128 GB package
    "MI300X": GPUKind(191.7, 1307.4, "MI300X"),
}


def _words(name: str) -> set[str]:
    return set(re.split(r"[\s/_-]+", name.upper())) - {""}


def gpu_kind_of(device_name: str) -> str | None:
    """The GPU_KINDS key for a device name as torch reports it ("NVIDIA A100-SXM4-80GB" -> "A100-80GB"): the
    entry whose every word appears in the name, the most specific one when several do; None when unknown."""
    words = _words(device_name)
    matches = [kind for kind, gpu in GPU_KINDS.items() if _words(gpu.device_name) <= words]
    return max(matches, key=lambda kind: len(_words(GPU_KINDS[kind].device_name))) if matches else None


def peak_tflops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak of the current GPU (or of `device_name`) from GPU_KINDS, None when unknown."""
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    kind = gpu_kind_of(device_name)
    return GPU_KINDS[kind].peak_tflops if kind else None


def memory_gib() -> float:
    """Peak memory of this process: GPU memory allocated on GPU, resident set size on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def live_tensor_gib(device_type: str | None = None) -> float:
    """GiB of the distinct storages behind every tensor Python still references (a gc walk), on one device
    type. Called between steps, when no activations are alive, it measures model states: parameters,
    gradients, optimizer states, and DeepSpeed's flat buffers and partitions, which RSS cannot separate."""
    import gc

    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    def has_memory(obj) -> bool:  # a tensor with real storage: not sparse, meta, or a compiler's fake tensor
        return (
            issubclass(type(obj), torch.Tensor)
            and not isinstance(obj, FakeTensor)
            and obj.layout is torch.strided
            and not obj.is_meta
            and torch._C._has_storage(obj)
            and (device_type is None or obj.device.type == device_type)
        )

    gc.collect()
    storages = {
        (t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
        for t in gc.get_objects()
        if has_memory(t)
    }
    return sum(storages.values()) / 2**30


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
    if not peak:
        return None
    return tokens_per_second * flops_per_token / (peak * 1e12 * devices)


class MetricsLog:
    """Rank 0 writes; other ranks' calls are no-ops."""

    def __init__(self, path: Path, enabled: bool, monitor=None):
        self.enabled, self.monitor = enabled, monitor
        self._file = open(path, "a") if enabled else None

    def write(self, record: dict, line: str | None = None) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if line:
            print(line, flush=True)
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            samples = record.get("samples", record["step"])
            events = [
                (f"Train/{k}", v, samples)
                for k, v in record.items()
                if k in ("loss", "val_loss", "tokens_per_second", "mfu", "perplexity") and v is not None
            ]
            self.monitor.write_events(events)

    def close(self) -> None:
        if self._file:
            self._file.close()


def format_step(
    step: int,
    max_steps: int,
    loss: float | None,
    lr: float,
    tokens_per_second: float,
    mfu_value: float | None,
    memory: float,
    eta_seconds: float,
) -> str:
    """One log line; `loss` None: every step since the last line was skipped (non-finite gradients)."""
    mfu_text = f"{100 * mfu_value:.1f}%" if mfu_value is not None else "n/a"
    eta = f"{int(eta_seconds // 3600)}:{int(eta_seconds % 3600 // 60):02d}:{int(eta_seconds % 60):02d}"
    loss_text = f"loss {loss:.4f}" if loss is not None else "skipped"
    return (
        f"step {step:>6}/{max_steps} | {loss_text} | lr {lr:.3e} | {tokens_per_second:,.0f} tok/s | "
        f"MFU {mfu_text} | mem {memory:.2f} GiB | ETA {eta}"
    )
