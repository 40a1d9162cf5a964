"""The training loop's callback base and the callbacks built on it.

:mod:`._base` (events, :class:`LoopState`, :class:`Callback`) knows nothing of the callbacks
here; each of them imports it. The loop (``runtime.training``) builds its callbacks from its
frozen worker config and fires the events.
"""

from runtime.training.callbacks._base import Callback, CallbackList, Event, LoopState
from runtime.training.callbacks._dist import all_reduce_sum
from runtime.training.callbacks._early_stopping import EarlyStopping
from runtime.training.callbacks._metrics import MlflowMetrics
from runtime.training.callbacks._oom import HISTORY_MODES, OomGuard, is_cuda_oom, release_memory, write_bundle_files
from runtime.training.callbacks._throughput import PEAK_ENV, Throughput, ThroughputMeter, mfu, peak_flops
from runtime.training.callbacks._tracker import MemoryTracker
from runtime.training.callbacks._watchdog import WatchdogActor, WatchdogClient, start_watchdogs, stop_watchdogs

__all__ = [
    "HISTORY_MODES",
    "PEAK_ENV",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "Event",
    "LoopState",
    "MemoryTracker",
    "MlflowMetrics",
    "OomGuard",
    "Throughput",
    "ThroughputMeter",
    "WatchdogActor",
    "WatchdogClient",
    "all_reduce_sum",
    "is_cuda_oom",
    "mfu",
    "peak_flops",
    "release_memory",
    "start_watchdogs",
    "stop_watchdogs",
    "write_bundle_files",
]
