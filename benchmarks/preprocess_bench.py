"""Preprocessing throughput and latency against scikit-learn's ColumnTransformer.

Both sides do the same work on the same synthetic rows: mean-impute + standardize six
numeric columns (~5% nulls) and one-hot encode three categorical columns (~50 categories,
a rare tail below ``min_frequency``, ~3% nulls; ours maps nulls and rare categories to the
OOV column, sklearn to its infrequent / missing columns, which the agreement check adds up).
sklearn and pandas are imported here only; ``runtime.preprocessing`` never needs them.

    python benchmarks/preprocess_bench.py [--rows 1000000] [--out benchmarks/results/preprocess.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runtime.preprocessing import FeatureSpec, fit

NUMERIC = [f"num_{i}" for i in range(6)]
CATEGORICAL = [f"cat_{i}" for i in range(3)]
N_CATEGORIES = 50
N_RARE = 5


def make_table(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {}
    for i, name in enumerate(NUMERIC):
        values = rng.normal(loc=10.0 * i, scale=1.0 + i, size=rows)
        columns[name] = pa.array(values, mask=rng.random(rows) < 0.05)
    frequent = 1.0 / np.arange(1, N_CATEGORIES - N_RARE + 1) ** 0.8
    weights = np.concatenate([frequent / frequent.sum() * (1 - N_RARE * 1e-4), np.full(N_RARE, 1e-4)])
    for name in CATEGORICAL:
        dictionary = pa.array([f"{name}_v{k:02d}" for k in range(N_CATEGORIES)])
        codes = rng.choice(N_CATEGORIES, size=rows, p=weights)
        indices = pa.array(codes, mask=rng.random(rows) < 0.03)
        columns[name] = dictionary.take(indices)
    return pa.table(columns)


def make_spec(min_frequency: int) -> FeatureSpec:
    return FeatureSpec.model_validate(
        {
            "features": [{"name": n, "type": "numeric", "impute": "mean"} for n in NUMERIC]
            + [{"name": n, "type": "categorical", "min_frequency": min_frequency} for n in CATEGORICAL]
        }
    )


def make_sklearn(min_frequency: int) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = Pipeline([("impute", SimpleImputer(strategy="mean")), ("scale", StandardScaler())])
    onehot = OneHotEncoder(
        handle_unknown="infrequent_if_exist", min_frequency=min_frequency, sparse_output=False, dtype=np.float32
    )
    return ColumnTransformer([("num", numeric, NUMERIC), ("cat", onehot, CATEGORICAL)], sparse_threshold=0)


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def check_agreement(ours: np.ndarray, names: list[str], theirs: np.ndarray, their_names: list[str]) -> float:
    """Max abs difference after mapping each of our columns onto sklearn's."""
    index = {n: i for i, n in enumerate(their_names)}
    worst = 0.0
    for j, name in enumerate(names):
        if "=" not in name:
            cols = [index[f"num__{name}"]]
        else:
            feature, value = name.split("=", 1)
            if value == "<oov>":  # OOV = sklearn's infrequent column + its missing-value column
                prefix = f"cat__{feature}_"
                known = {f"cat__{n}" for n in names if n.startswith(feature + "=") and n != name}
                known = {k.replace("=", "_", 1) for k in known}
                cols = [i for n, i in index.items() if n.startswith(prefix) and n not in known]
            else:
                cols = [index[f"cat__{feature}_{value}"]]
        expected = theirs[:, cols].sum(axis=1)
        if not np.allclose(ours[:, j], expected, rtol=1e-5, atol=1e-5):
            raise SystemExit(f"outputs disagree on column {name!r} (sklearn columns {cols})")
        worst = max(worst, float(np.max(np.abs(ours[:, j] - expected))))
    return worst


def record_latency(fp: Any, table: pa.Table, calls: int) -> dict[str, float]:
    records = table.slice(0, calls).to_pylist()
    for rec in records[:200]:  # warm up
        fp.transform_records([rec])
    times = np.empty(len(records))
    for i, rec in enumerate(records):
        start = time.perf_counter_ns()
        fp.transform_records([rec])
        times[i] = time.perf_counter_ns() - start
    us = times / 1e3
    return {
        "calls": len(records),
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
    }


def machine_info() -> dict[str, Any]:
    import pandas
    import sklearn

    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "pandas": pandas.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/preprocess.json"))
    args = parser.parse_args(argv)
    rows = args.rows
    min_frequency = max(2, rows // 2000)

    table = make_table(rows)
    frame = table.to_pandas()
    spec = make_spec(min_frequency)
    print(f"{rows} rows, {len(NUMERIC)} numeric + {len(CATEGORICAL)} categorical, min_frequency={min_frequency}")

    our_fit, fp = best_of(args.repeats, lambda: fit(spec, table))
    # online latency first, in a process that is not yet holding gigabytes of batch outputs
    latency = record_latency(fp, table, args.latency_calls)
    our_transform, ours = best_of(args.repeats, lambda: fp.transform(table))

    ct = make_sklearn(min_frequency)
    sk_fit, _ = best_of(args.repeats, lambda: ct.fit(frame))
    sk_transform, theirs = best_of(args.repeats, lambda: ct.transform(frame))
    max_diff = check_agreement(ours, fp.feature_names, np.asarray(theirs), list(ct.get_feature_names_out()))
    del ours, theirs

    result = {
        "benchmark": "preprocess",
        "rows": rows,
        "output_dim": fp.output_dim,
        "repeats": args.repeats,
        "ours": {
            "fit_s": our_fit,
            "transform_s": our_transform,
            "fit_rows_per_s": rows / our_fit,
            "transform_rows_per_s": rows / our_transform,
        },
        "sklearn": {
            "fit_s": sk_fit,
            "transform_s": sk_transform,
            "fit_rows_per_s": rows / sk_fit,
            "transform_rows_per_s": rows / sk_transform,
        },
        "speedup": {"fit": sk_fit / our_fit, "transform": sk_transform / our_transform},
        "agreement": {"allclose": True, "max_abs_diff": max_diff},
        "one_record_transform_records": latency,
        "machine": machine_info(),
    }
    print(f"{'':10}{'fit rows/s':>14}{'transform rows/s':>18}")
    print(f"{'ours':10}{rows / our_fit:14,.0f}{rows / our_transform:18,.0f}")
    print(f"{'sklearn':10}{rows / sk_fit:14,.0f}{rows / sk_transform:18,.0f}")
    print(f"ratio ours/sklearn (rows/s): fit {sk_fit / our_fit:.1f}x, transform {sk_transform / our_transform:.1f}x")
    print(f"outputs agree with sklearn (allclose), max abs diff {max_diff:.2e}")
    print(
        f"one record via transform_records: p50 {latency['p50_us']:.1f} us, p99 {latency['p99_us']:.1f} us "
        f"over {latency['calls']} calls"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
