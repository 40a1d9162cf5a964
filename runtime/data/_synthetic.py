"""A synthetic tabular dataset with learnable signal, nulls and a drift knob.

The generator writes Parquet in fixed-size chunks with ``pyarrow.parquet.ParquetWriter``,
so any number of rows takes bounded memory. Chunk ``i`` uses its own RNG stream derived
from ``(seed, i)``, so the data is a pure function of the config.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from runtime.errors import ConfigError

Task = Literal["binary", "multiclass", "regression"]

NUMERIC = ("age", "income", "tenure_months", "support_calls")
CATEGORICAL = ("plan", "region", "device")
PLANS = ("basic", "standard", "premium", "enterprise")
REGIONS = tuple(f"region_{i:02d}" for i in range(20))
DEVICES = ("ios", "android", "web", "desktop", "tv")
LABEL = {"binary": "churned", "multiclass": "segment", "regression": "monthly_spend"}


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate.

    ``shift`` moves feature distributions for drift tests: for a numeric column the value
    is added in units of that column's standard deviation; for a categorical column it tilts
    the category probabilities towards the last categories (0 = none, 1 = strong).
    """

    rows: int = 10_000
    seed: int = 0
    task: Task = "binary"
    null_fraction: float = 0.03
    shift: dict[str, float] = field(default_factory=dict)
    chunk_rows: int = 100_000

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ConfigError(f"rows ({self.rows}) must be >= 1")
        if not 0.0 <= self.null_fraction < 1.0:
            raise ConfigError(f"null_fraction ({self.null_fraction}) must be in [0, 1)")
        if self.chunk_rows < 1:
            raise ConfigError(f"chunk_rows ({self.chunk_rows}) must be >= 1")
        if self.task not in LABEL:
            raise ConfigError(f"task {self.task!r} must be one of {sorted(LABEL)}")
        unknown = set(self.shift) - set(NUMERIC) - set(CATEGORICAL)
        if unknown:
            raise ConfigError(
                f"shift names unknown columns {sorted(unknown)}; valid columns: {sorted(NUMERIC + CATEGORICAL)}"
            )


# The synthetic label of each task, from the row's score and logistic noise.
_LABELS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "binary": lambda score, noise, rng: (score + noise > 0).astype(np.int64),
    "multiclass": lambda score, noise, rng: np.digitize(score + 0.5 * noise, [-1.0, 0.5]).astype(np.int64),
    "regression": lambda score, noise, rng: 50.0 + 10.0 * score + rng.normal(0.0, 2.0, len(score)),
}


def _tilted(probs: np.ndarray, amount: float) -> np.ndarray:
    if amount == 0:
        return probs
    ramp = np.linspace(0.0, 1.0, len(probs))
    weights = probs * np.exp(3.0 * amount * ramp)
    return weights / weights.sum()


def _chunk(cfg: SyntheticConfig, index: int, n: int) -> pa.Table:
    rng = np.random.default_rng([cfg.seed, index])
    s = cfg.shift
    age = rng.normal(40 + 12 * s.get("age", 0.0), 12, n).clip(18, 95)
    income = np.exp(rng.normal(10.8 + 0.6 * s.get("income", 0.0), 0.6, n))
    tenure = rng.gamma(2.0, 12.0, n) + 14.0 * s.get("tenure_months", 0.0)
    calls = rng.poisson(1.5, n).astype(np.float64) + 1.5 * s.get("support_calls", 0.0)

    plan_p = _tilted(np.array([0.4, 0.3, 0.2, 0.1]), s.get("plan", 0.0))
    region_p = _tilted(np.full(len(REGIONS), 1.0 / len(REGIONS)), s.get("region", 0.0))
    device_p = _tilted(np.array([0.3, 0.3, 0.25, 0.1, 0.05]), s.get("device", 0.0))
    plan = rng.choice(len(PLANS), n, p=plan_p)
    region = rng.choice(len(REGIONS), n, p=region_p)
    device = rng.choice(len(DEVICES), n, p=device_p)

    # The signal: a fixed linear score over standardized features plus category effects.
    score = (
        -0.04 * (age - 40)
        - 0.8 * (np.log(income) - 10.8)
        - 0.05 * (tenure - 24)
        + 0.6 * (calls - 1.5)
        + np.array([0.8, 0.2, -0.4, -0.9])[plan]
        + np.where(region < 5, 0.5, 0.0)
        + np.array([0.0, 0.1, 0.3, -0.2, 0.4])[device]
    )
    label = _LABELS[cfg.task](score, rng.logistic(0.0, 1.0, n), rng)

    def with_nulls(values: np.ndarray) -> pa.Array:
        mask = rng.random(n) < cfg.null_fraction if cfg.null_fraction else None
        return pa.array(values, mask=mask)

    def categories(codes: np.ndarray, names: tuple[str, ...]) -> pa.Array:
        arr = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names))
        plain = arr.cast(pa.string())
        if cfg.null_fraction:
            mask = pa.array(rng.random(n) < cfg.null_fraction)
            plain = pa.compute.if_else(mask, pa.scalar(None, pa.string()), plain)
        return plain

    return pa.table(
        {
            "age": with_nulls(np.round(age, 1)),
            "income": with_nulls(np.round(income, 2)),
            "tenure_months": pa.array(np.round(tenure, 1)),
            "support_calls": with_nulls(calls),
            "plan": categories(plan, PLANS),
            "region": categories(region, REGIONS),
            "device": pa.array(np.array(DEVICES)[device]),
            LABEL[cfg.task]: pa.array(label),
        }
    )


def generate_synthetic(path: str | os.PathLike[str], config: SyntheticConfig | None = None) -> str:
    """Write the dataset to ``path`` (one Parquet file) and return the path."""
    import pyarrow.compute  # noqa: F401  (registers pa.compute)

    cfg = config or SyntheticConfig()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    writer: pq.ParquetWriter | None = None
    try:
        for i in range(math.ceil(cfg.rows / cfg.chunk_rows)):
            n = min(cfg.chunk_rows, cfg.rows - i * cfg.chunk_rows)
            table = _chunk(cfg, i, n)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def synthetic_feature_spec(task: Task = "binary") -> dict[str, Any]:
    """The feature spec (as a dict, the YAML's content) that fits the synthetic data."""
    return {
        "label": {"name": LABEL[task], "task": task},
        "features": [
            {"name": "age", "type": "numeric", "impute": "median", "clip": [18, 95]},
            {"name": "income", "type": "numeric", "impute": "median", "clip": [0, None], "log1p": True},
            {"name": "tenure_months", "type": "numeric", "nullable": False},
            {
                "name": "support_calls",
                "type": "numeric",
                "impute": "constant",
                "impute_value": 0.0,
                "bucketize": [1, 2, 4],
            },
            {"name": "plan", "type": "categorical", "encoding": "onehot"},
            {"name": "region", "type": "categorical", "min_frequency": 5, "encoding": "onehot"},
            {"name": "device", "type": "categorical", "nullable": False, "encoding": "onehot"},
        ],
    }
