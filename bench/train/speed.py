"""How fast the trainer runs, not what it computes: the speed switches of `runtime.speed`, resolved for a
device, and how they are put on a model and taken off again.

Every switch leaves the loss the same up to floating-point rounding, which is why they live under `runtime`
and stay out of the run's hash: a checkpoint trained with `compile` on resumes with it off. `bench profile`
measures each one.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

SWITCHES = ("compile", "tf32", "channels_last", "grad_checkpointing", "fused_optimizer", "pin_memory")


@dataclass(frozen=True)
class Speed:
    compile: bool = False            # torch.compile of the towers and decoders (training mode only)
    tf32: bool = False               # TF32 tensor cores for what runs in fp32 on CUDA
    channels_last: bool = False      # images and the patch convolution in channels-last layout
    grad_checkpointing: bool = False  # recompute tower and decoder activations in backward: memory for time
    attention: str = "fused"         # fused: SDPA picks flash / memory-efficient / cuDNN | math: unfused reference
    fused_optimizer: bool = False    # AdamW's fused kernels (CPU and CUDA)
    pin_memory: bool = False         # page-locked loader batches, copied to the GPU without blocking

    @classmethod
    def resolve(cls, settings: Mapping[str, Any] | None, device: torch.device) -> "Speed":
        """`runtime.speed` (checked with the rest of the configuration, bench.experiment.config_checks) for `device`: `auto`
        is on for CUDA and off for CPU (where compilation costs more than it saves on small models and the rest
        does not apply), except `fused_optimizer`, on for both."""
        settings = dict(settings or {})
        cuda = device.type == "cuda"
        values: dict[str, Any] = {}
        for name in SWITCHES:
            value = settings.get(name, "auto")
            # torch has fused AdamW kernels for CPU as well as CUDA
            values[name] = (cuda or name == "fused_optimizer") if value == "auto" else bool(value)
        if not cuda:  # CUDA-only kernels and memory
            values.update(tf32=False, pin_memory=False)
        return cls(attention=settings.get("attention", "fused"), **values)

    def as_dict(self) -> dict:
        return asdict(self)

    @contextmanager
    def kernels(self) -> Iterator[None]:
        """Around a forward and backward: TF32 on or off, and `math` attention restricted to SDPA's reference
        kernel. The process-wide flags are restored on exit."""
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            if self.attention == "fused":
                yield
            else:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.MATH]):
                    yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def put_on(self, model: nn.Module) -> None:
        """Switch `model` (already on its device) to these settings; `take_off` undoes what stays on the model."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        for module in accelerated_modules(model):
            module.set_grad_checkpointing(self.grad_checkpointing)
            if self.compile:
                _compile_in_training(module)

    @staticmethod
    def take_off(model: nn.Module) -> None:
        compiled = False
        for module in accelerated_modules(model):
            module.set_grad_checkpointing(False)
            # the compiled dispatcher goes, and the class's forward shows again
            compiled |= module.__dict__.pop("forward", None) is not None
        if compiled:
            # drop the compiled code: each new model would otherwise add graphs until dynamo's cache limit
            # silently sends later models (the next sweep trial) back to eager
            torch._dynamo.reset()

    def images(self, images: torch.Tensor | None) -> torch.Tensor | None:
        if images is None or not self.channels_last or images.ndim != 4:
            return images
        return images.contiguous(memory_format=torch.channels_last)


def accelerated_modules(model: nn.Module) -> list[nn.Module]:
    """The towers and decoders of `model`: the modules that compile and checkpoint (fixed shapes, most of the
    work); they implement `set_grad_checkpointing(bool)`."""
    from bench.modeling.decoders import ImageDecoder, TextDecoder
    from bench.modeling.towers import TextTower, VisionTower

    return [m for m in model.modules() if isinstance(m, (VisionTower, TextTower, ImageDecoder, TextDecoder))]


class _TrainingDispatch:
    """Calls the compiled forward in training mode and the eager one otherwise, so evaluation inside training
    (validation hooks, other batch sizes, no_grad) never triggers a recompilation."""

    def __init__(self, module: nn.Module):
        self.module, self.eager = module, module.forward
        self.compiled: Callable = torch.compile(module.forward)

    def __call__(self, *args, **kwargs):
        return (self.compiled if self.module.training else self.eager)(*args, **kwargs)


def _compile_in_training(module: nn.Module) -> None:
    if "forward" not in module.__dict__:
        module.forward = _TrainingDispatch(module)


def loader_workers(setting: int | str, device: torch.device) -> int:
    """`runtime.num_workers`: a count, or `auto` (on CUDA up to 8 worker processes, leaving a core to the main
    one; on CPU none, since workers would take cores from the model's own threads)."""
    if setting == "auto":
        return max(0, min(8, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0
    return int(setting)
