"""Throughput and model FLOPs utilization (MFU): tokens/s against the hardware's peak.

``MFU = tokens_per_s * flops_per_token / peak_flops`` (PaLM, appendix B). The peak is the
dense (no 2:4 sparsity) tensor-core rate from NVIDIA's datasheets: half of the headline
"with sparsity" figure. Values in TFLOP/s per GPU:

============  ======  ======  ======  =========================================
GPU           bf16    tf32    fp32    ``torch.cuda.get_device_name()`` contains
============  ======  ======  ======  =========================================
H100 NVL      835     417.5   60      ``H100 NVL``
H100 PCIe     756     378     51      ``H100 PCIe``
H100 SXM      989     494.5   67      ``H100`` (e.g. ``NVIDIA H100 80GB HBM3``)
H200 NVL      835     417.5   60      ``H200 NVL``
H200 SXM      989     494.5   67      ``H200``
A100          312     156     19.5    ``A100`` (SXM4 and PCIe share the peak)
L4            121     60      30.3    ``L4`` (a whole word: not L40 / L40S)
A10G          70      35      31.2    ``A10G`` (AWS's A10 variant, per AWS)
============  ======  ======  ======  =========================================

``fp16`` reads the ``bf16`` column (same tensor-core rate on these parts); ``fp32`` is the
plain CUDA-core rate, ``tf32`` the tensor-core rate that fp32 matmuls get when
``torch.backends.cuda.matmul.allow_tf32`` is on. A MIG slice ``Ng.*`` gets ``N / 7`` of the
device (approximate: compute slices are sevenths of the GPCs). ``SKEWLESS_PEAK_TFLOPS``
overrides the table (for another GPU, a clock-capped part, or a CPU).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

from runtime.errors import ConfigError
from runtime.training.callbacks._base import Callback, LoopState
from runtime.training.callbacks._dist import all_reduce_sum

PEAK_ENV = "SKEWLESS_PEAK_TFLOPS"
DTYPES = ("bf16", "fp16", "tf32", "fp32")

# First match wins: the more specific names come before the ones they contain.
_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bH100 NVL\b", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100 PCIe\b", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (r"\bH100\b", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    (r"\bH200 NVL\b", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    (r"\bA100\b", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10G\b", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
)
_MIG = re.compile(r"\bMIG (\d)g\.", re.IGNORECASE)


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of one device for ``dtype``; ``None`` for a CPU or an unknown GPU.

    ``device_name`` is what ``torch.cuda.get_device_name()`` returns. ``SKEWLESS_PEAK_TFLOPS``
    (in TFLOP/s) wins over the table, whatever the device.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} must be one of {list(DTYPES)}")
    override = os.environ.get(PEAK_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise ConfigError(
                f"{PEAK_ENV}={override!r} must be a positive number of TFLOP/s (e.g. 989 for an H100 SXM "
                "in bf16); unset it to use the built-in table"
            )
        return value * 1e12
    column = "bf16" if dtype == "fp16" else dtype
    for pattern, peaks in _PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            mig = _MIG.search(device_name)
            fraction = int(mig.group(1)) / 7 if mig else 1.0
            return peaks[column] * 1e12 * fraction
    return None


def mfu(tokens_per_s: float | None, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1]: achieved model FLOP/s over the peak; ``None`` if unknown."""
    if tokens_per_s is None or peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


class Throughput:
    """Tokens/s over training steps, leaving out the first ``warmup_steps`` (compilation,
    allocator growth, cuDNN autotuning).

    Call :meth:`start` before a step and :meth:`stop` after it with the step's token
    count. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read so that
    asynchronous GPU work is timed, not just queued. Until a step past the warm-up is
    measured, the warm-up steps themselves are the estimate.
    """

    def __init__(self, warmup_steps: int = 2, sync: Callable[[], object] | None = None) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be >= 0")
        self.warmup_steps = warmup_steps
        self._sync = sync
        self._t0: float | None = None
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0
        self._warm_tokens = 0
        self._warm_seconds = 0.0

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self, tokens: int) -> None:
        if self._t0 is None:
            raise RuntimeError("Throughput.stop() called without start()")
        elapsed = self._now() - self._t0
        self._t0 = None
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self._warm_tokens += tokens
            self._warm_seconds += elapsed
        else:
            self.tokens += tokens
            self.seconds += elapsed

    def add_window(self, steps: int, tokens: int, seconds: float) -> None:
        """``steps`` steps timed together (one clock read at each end); a window counts as
        warm-up while the steps before it have not reached ``warmup_steps``."""
        warm = self.steps < self.warmup_steps
        self.steps += steps
        if warm:
            self._warm_tokens += tokens
            self._warm_seconds += seconds
        else:
            self.tokens += tokens
            self.seconds += seconds

    @property
    def tokens_per_s(self) -> float | None:
        """Measured rate; ``None`` before any step has been timed."""
        if self.seconds > 0:
            return self.tokens / self.seconds
        if self._warm_seconds > 0:
            return self._warm_tokens / self._warm_seconds
        return None


class ThroughputMeter(Callback):
    """Tokens (or rows) per second over each reporting interval, and MFU where the peak is known.

    Adds ``tokens_per_s`` (all ranks together) and, when the device's peak is known
    (:func:`peak_flops`), ``mfu`` to ``state.metrics`` at each epoch end; the first
    ``warmup_steps`` steps of the run (compilation, allocator growth) are left out.
    """

    def __init__(self, flops_per_token: float, precision: str = "bf16", warmup_steps: int = 3) -> None:
        self.flops_per_token = flops_per_token
        self.precision = precision
        self.warmup_steps = warmup_steps
        self.peak: float | None = None
        self._meter: Throughput | None = None
        self._sync: Callable[[], object] | None = None
        self._seen = self._tokens = self._steps = 0
        self._t0 = 0.0

    def on_run_start(self, state: LoopState) -> None:
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            dtype = (
                "bf16" if self.precision == "bf16" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
            )
            self.peak = peak_flops(torch.cuda.get_device_name(), dtype)
        else:
            self.peak = peak_flops("cpu", "fp32")  # None unless SKEWLESS_PEAK_TFLOPS says
        self._sync = torch.cuda.synchronize if cuda else None
        self._meter = Throughput(self.warmup_steps)
        self._seen = 0

    # The clock is read (after a device sync) at the edges of a window, not at every step: a
    # sync per step would stop the host from queueing step N+1 while the GPU runs step N.
    # Windows: an epoch (evaluation and reporting between epochs are not training time),
    # split once where the warm-up steps end.

    def _clock(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def on_epoch_start(self, state: LoopState) -> None:
        if self._meter is not None:
            self._t0, self._tokens, self._steps = self._clock(), 0, 0

    def on_step_end(self, state: LoopState) -> None:
        if self._meter is None:
            return
        self._seen += 1
        self._tokens += state.last_count
        self._steps += 1
        if self._seen == self.warmup_steps:  # close the warm-up window
            self._close()
            self._t0 = self._clock()

    def _close(self) -> None:
        """Add the open window (if it has steps) and empty it."""
        if self._meter is not None and self._steps:
            self._meter.add_window(self._steps, self._tokens, self._clock() - self._t0)
        self._tokens, self._steps = 0, 0

    def on_epoch_train_end(self, state: LoopState) -> None:
        self._close()  # before evaluation: it is not training time

    def on_epoch_end(self, state: LoopState) -> None:
        if self._meter is None:
            return
        self._close()  # a loop that fires no on_epoch_train_end: the window ends here
        (tps,) = all_reduce_sum([self._meter.tokens_per_s or 0.0])
        state.metrics["tokens_per_s"] = tps
        utilization = mfu(tps, self.flops_per_token, self.peak * state.world_size if self.peak else None)
        if utilization is not None:
            state.metrics["mfu"] = utilization
