"""Where a worker's batches come from, epoch by epoch.

- :class:`InMemorySource`: the split preprocessed once into the object store
  (:class:`~runtime.training._ingest.InMemoryData`). Every worker fetches the blocks, puts the
  rows in the order of their content key (:data:`runtime.data.ORDER_KEY`) and, each epoch,
  deals a global permutation drawn from ``(seed, epoch)`` round-robin to the ranks. What a
  rank sees, and in which order, depends on the data, the seed and the number of workers
  only: not on how many CPUs the cluster has or how its readers cut the files into blocks.
  An epoch costs a permutation and the copies of its batches: no pipeline start-up.
- :class:`StreamingSource`: Ray Train's dataset shards (``get_dataset_shard``); Ray Data
  re-reads and re-preprocesses the files every epoch; rows are shuffled within windows of a
  few batches (:func:`shuffled_batches`).
- :class:`TokenSource`: random windows of a token array (the language-model job); the
  windows of a step are drawn from ``(seed, rank, step)``, so a resumed run draws the same.

Each yields ``dict[str, numpy array]`` batches of this rank's share of the effective batch,
and skips the steps a resumed epoch already trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from runtime.data import ORDER_KEY
from runtime.preprocessing import FEATURES, LABEL
from runtime.training._objective import TOKENS

EVAL_ROWS = 4096
SHUFFLE_WINDOW_BATCHES = 8  # a streamed epoch shuffles within windows of this many batches
SHUFFLE_WINDOW_ROWS = 1024  # and of at least this many rows


def shuffled_batches(
    windows: Iterator[dict[str, np.ndarray]], batch_size: int, rng: np.random.Generator
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows, each window's rows in a random order (the last batch of
    the last window may be short).

    The local shuffle of a streamed epoch. Ray Data's ``local_shuffle_buffer_size`` does the
    same job on Arrow blocks and cost the training process 0.59 s per million rows of 39
    features; iterating windows and permuting them here costs 0.22 s.
    """
    for window in windows:
        n = len(next(iter(window.values())))
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield {name: column[idx] for name, column in window.items()}


class Source:
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def total_steps(self, epochs: int) -> int:
        """The run's optimizer steps (what a learning-rate schedule spans)."""
        return self.steps_per_epoch() * epochs

    def batches(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


def _canonical(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The blocks' rows concatenated and sorted by their content key (stable)."""
    if not parts:
        return {FEATURES: np.zeros((0, 0), np.float32), LABEL: np.zeros(0)}
    keys = np.concatenate([p[ORDER_KEY] for p in parts])
    order = np.argsort(keys, kind="stable")
    return {name: np.concatenate([p[name] for p in parts])[order] for name in (FEATURES, LABEL)}


class InMemorySource(Source):
    def __init__(self, data: Any, rank: int, world: int, per_rank: int, seed: int) -> None:
        import ray

        self.rank, self.world, self.per_rank, self.seed = rank, world, per_rank, seed
        self.train = _canonical(list(ray.get(list(data.train))))
        self.validation = _canonical(list(ray.get(list(data.validation))))
        total = len(self.train[LABEL])
        self.rows = total // world  # every rank the same count, as Ray's equal split does
        if self.rows == 0:
            from runtime.errors import ConfigError

            raise ConfigError(f"{total} training rows cannot feed {world} workers; lower training.num_workers")

    def steps_per_epoch(self) -> int:
        return math.ceil(self.rows / self.per_rank)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        n = len(self.train[LABEL])
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        mine = order[self.rank :: self.world][: self.rows]
        for start in range(skip * self.per_rank, self.rows, self.per_rank):
            idx = mine[start : start + self.per_rank]
            yield {FEATURES: self.train[FEATURES][idx], LABEL: self.train[LABEL][idx]}

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        x, y = self.validation[FEATURES][self.rank :: self.world], self.validation[LABEL][self.rank :: self.world]
        for start in range(0, len(y), EVAL_ROWS):
            yield {FEATURES: x[start : start + EVAL_ROWS], LABEL: y[start : start + EVAL_ROWS]}


class StreamingSource(Source):
    def __init__(self, train_rows: int, rank: int, world: int, per_rank: int, seed: int) -> None:
        import ray.train

        self.rank, self.world, self.per_rank, self.seed = rank, world, per_rank, seed
        self.train_rows = train_rows
        self.train = ray.train.get_dataset_shard("train")
        self.validation = ray.train.get_dataset_shard("validation")

    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_rows / (self.per_rank * self.world))

    def batches(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        per_window = max(SHUFFLE_WINDOW_BATCHES, -(-SHUFFLE_WINDOW_ROWS // self.per_rank))
        windows = self.train.iter_batches(batch_size=self.per_rank * per_window, batch_format="numpy")
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        for i, batch in enumerate(shuffled_batches(windows, self.per_rank, rng)):
            if i >= skip:  # a resumed epoch: the first ``skip`` steps are in the checkpoint
                yield batch

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        yield from self.validation.iter_batches(batch_size=EVAL_ROWS, batch_format="numpy")


def window_starts(tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
    """Where :func:`sample_windows`'s windows start (the draws, without the cutting)."""
    return rng.integers(0, len(tokens) - seq_len, size=batch_size)


def sample_windows(tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
    """``batch_size`` random windows of ``seq_len + 1`` tokens (inputs and next-token targets)."""
    starts = window_starts(tokens, rng, batch_size, seq_len)
    return np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[starts].astype(np.int64)


class TokenSource(Source):
    """``steps`` steps in epochs of ``steps_per_epoch`` (the reporting interval); the last may be shorter."""

    def __init__(
        self,
        train: np.ndarray,
        valid: np.ndarray,
        rank: int,
        per_rank: int,
        seq_len: int,
        steps: int,
        steps_per_epoch: int,
        eval_batches: int,
        seed: int,
        device: Any = None,
    ) -> None:
        self.train_tokens, self.valid_tokens = train, valid
        self.rank, self.per_rank, self.seq_len, self.seed = rank, per_rank, seq_len, seed
        self.steps, self.interval, self.n_eval = steps, steps_per_epoch, eval_batches
        self.device = device
        self._on_device: Any = None
        if device is not None:  # one copy of the training tokens on the device, as they are (bytes)
            import torch

            # torch.tensor copies, so a read-only (object-store or memory-mapped) array is fine
            self._on_device = torch.tensor(train, device=device)
            self._offsets = torch.arange(seq_len + 1, device=device)

    def steps_per_epoch(self) -> int:
        return self.interval

    def total_steps(self, epochs: int) -> int:
        return self.steps  # the last epoch may be shorter than the interval

    def batches(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        first = epoch * self.interval
        for step in range(first + skip, min(first + self.interval, self.steps)):
            rng = np.random.default_rng([self.seed, self.rank, step])
            if self._on_device is None:
                yield {TOKENS: sample_windows(self.train_tokens, rng, self.per_rank, self.seq_len)}
            else:  # the same windows (the same draws), cut on the device: only the starts travel
                yield {TOKENS: self._device_windows(window_starts(self.train_tokens, rng, self.per_rank, self.seq_len))}

    def _device_windows(self, starts: np.ndarray) -> Any:
        import torch

        index = torch.from_numpy(starts).to(self.device, non_blocking=True)[:, None] + self._offsets
        return self._on_device[index].long()

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng([self.seed, 1 << 30, self.rank])  # the same windows every time
        for _ in range(self.n_eval):
            yield {TOKENS: sample_windows(self.valid_tokens, rng, self.per_rank, self.seq_len)}
