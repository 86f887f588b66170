"""Throughput, MFU and memory, and the run's log: one readable line on stdout, one JSON object per
line in `metrics.jsonl`, and DeepSpeed's monitor (TensorBoard / CSV / W&B) when the JSON enables it."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

# Dense bf16 peak TFLOP/s per GPU (no sparsity). RTX 4090: fp32 accumulate, as training uses.
PEAK_TFLOPS = {
    "A100": 312.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_tflops(device_name: str | None = None) -> float | None:
    """Peak of the current GPU by its name (longest table key that appears in it), None when unknown."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper().replace("NVIDIA", "").replace("GEFORCE", "")
    if "H100" in name and "PCIE" in name:
        return PEAK_TFLOPS["H100 PCIe"]
    matches = [key for key in PEAK_TFLOPS if key.upper() in name]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def memory_gib() -> float:
    """Peak memory of this process: GPU memory allocated on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def live_tensor_gib(device_type: str | None = None) -> float:
    """GiB of the distinct storages behind every tensor Python still references (a gc walk), on one device
    type. Called between steps, when no activations are alive, it measures model states: parameters,
    gradients, optimizer states, and DeepSpeed's flat buffers and partitions, which RSS cannot separate."""
    import gc

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
