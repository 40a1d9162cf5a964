"""The one collective the loop and its callbacks share: a float64 sum over ranks."""

from __future__ import annotations

from typing import Any


def all_reduce_sum(values: list[float], device: Any = None) -> list[float]:
    """Sum ``values`` over ranks (a no-op outside a process group). The tensor lives on
    ``device`` when it is a GPU (NCCL needs it there), on the CPU otherwise (gloo)."""
    import torch
    import torch.distributed as dist

    on = device if getattr(device, "type", None) == "cuda" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=on)
    if dist.is_available() and dist.is_initialized():
        if on == "cpu" and dist.get_backend() == "nccl":
            on = torch.device("cuda", torch.cuda.current_device())  # NCCL reduces device tensors only
            t = t.to(on)
        dist.all_reduce(t)
    return [float(v) for v in t.tolist()]
