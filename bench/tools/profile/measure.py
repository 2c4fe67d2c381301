"""What a step costs, whatever the method: the device's peak FLOP rate, memory, model FLOPs."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from bench.data.batch import Batch

VENDOR_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                      ("H800", 989.4), ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
                      ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
                      ("RTX 4090", 165.2), ("RTX 3090", 71.0))


def vendor_bf16_tflops(name: str) -> float | None:
    return next((tflops for fragment, tflops in VENDOR_BF16_TFLOPS if fragment in name), None)


def measured_bf16_tflops(device: torch.device, n: int = 8192, repeats: int = 30) -> float | None:
    """The bf16 matmul rate this device reaches (TFLOP/s) on an n x n x n product, or None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000.0
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n ** 3 * repeats / seconds / 1e12


# --- memory ---------------------------------------------------------------------------------------------------
class MemoryMeter:
    """Peak memory of one step: CUDA's allocated bytes, or on CPU the process's resident set (its high-water
    mark is reset through /proc/self/clear_refs, Linux only). What other configurations keep resident is
    subtracted, what this one keeps resident (weights, optimiser state, device batches) is added."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda-allocated" if device.type == "cuda" else "process-rss"
        self.available = device.type == "cuda" or Path("/proc/self/clear_refs").exists()

    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status("VmRSS")

    def start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.available = False
        return self._now()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status("VmHWM")


def _proc_status(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    out = []
    for value in vars(batch).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif hasattr(value, "input_ids"):
            out += [value.input_ids, value.attention_mask]
    return out


# --- batches ----------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
