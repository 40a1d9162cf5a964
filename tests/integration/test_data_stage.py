"""The training data stage on the session's Ray: Parquet read in row-group pieces, each fused
with the split and the transform into one task, the same rows as one process computes, CSV
through the same stage, and a streamed training run fed every training row each epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from runtime.data import ORDER_KEY, SyntheticConfig, generate_synthetic, split_side, synthetic_feature_spec
from runtime.preprocessing import FeatureSpec, fit, transform_batch
from runtime.training import Callback, LoopState, TrainJobConfig, features_stage, open_split, run_training

pytestmark = pytest.mark.integration

ROWS, ROW_GROUP = 600_000, 100_000  # 6 row groups: 3 pieces of 2 (pieces hold up to 262,144 rows)
SPLIT = (0.1, 0.1, 0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Any]:
    path = tmp_path_factory.mktemp("stage") / "d.parquet"
    table = pq.read_table(generate_synthetic(path, SyntheticConfig(rows=ROWS, seed=8)))
    pq.write_table(table, path, row_group_size=ROW_GROUP)
    spec = FeatureSpec.model_validate(synthetic_feature_spec())
    columns = [f.name for f in spec.features] + [spec.label.name]  # type: ignore[union-attr]
    return path, columns, fit(spec, table.slice(0, 50_000))


def _one_process(table: pa.Table, columns: list[str], prep: Any) -> dict[str, np.ndarray]:
    train = split_side(table, columns, *SPLIT, side="train", order_key=True)
    out = transform_batch(train, state=prep.to_json(), keep=(ORDER_KEY,))
    order = np.argsort(out[ORDER_KEY], kind="stable")
    return {k: v[order] for k, v in out.items()}


def _by_key(ds: Any) -> dict[str, np.ndarray]:
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("x", "y", ORDER_KEY)}
    order = np.argsort(out[ORDER_KEY], kind="stable")
    return {k: v[order] for k, v in out.items()}


def test_each_piece_is_read_split_and_transformed_in_one_task_with_the_rows_of_one_process(
    ray_session: Any, dataset: tuple[Path, list[str], Any]
) -> None:
    path, columns, prep = dataset
    ds = features_stage(open_split(str(path), "parquet", columns, *SPLIT)["train"], prep).materialize()
    stats = ds.stats()
    # one operator: the read fused with both map stages, one task per piece, no raw rows in between
    assert "ReadParquetRowGroups->MapBatches(split_side)->MapBatches(transform_batches): 3 tasks executed" in stats, (
        stats
    )
    got, want = _by_key(ds), _one_process(pq.read_table(path), columns, prep)
    assert got["x"].dtype == np.float32 and got["x"].shape == want["x"].shape
    for k in ("x", "y", ORDER_KEY):
        assert np.array_equal(got[k], want[k]), k


def test_csv_goes_through_the_same_stage_with_the_same_rows(
    ray_session: Any, tmp_path: Path, dataset: tuple[Path, list[str], Any]
) -> None:
    path, columns, prep = dataset
    table = pq.read_table(path).slice(0, 20_000)
    csv = tmp_path / "d.csv"
    pacsv.write_csv(table.append_column("extra", pa.array(["unused"] * table.num_rows)), csv)
    ds = features_stage(open_split(str(csv), "csv", columns, *SPLIT)["train"], prep)
    got, want = _by_key(ds), _one_process(pacsv.read_csv(csv), columns, prep)  # CSV's own types and nulls
    for k in ("x", "y", ORDER_KEY):
        assert np.array_equal(got[k], want[k]), k


class _RowsPerEpoch(Callback):
    """Each rank appends (epoch, rows of the step) to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_step_end(self, state: LoopState) -> None:
        with open(f"{self.path}.{state.rank}", "a") as f:
            f.write(json.dumps([state.epoch, state.last_count]) + "\n")


def test_a_streamed_run_feeds_every_training_row_each_epoch(ray_session: Any, tmp_path: Path) -> None:
    data = Path(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=6000, seed=12)))
    cfg = TrainJobConfig.model_validate(
        {
            "data": {"path": str(data), "ingest": "stream"},
            "features": synthetic_feature_spec(),
            "model": {"hidden": [16]},
            "training": {"epochs": 2, "batch_size": 128, "num_workers": 2, "seed": 3},
            "memory": {"track": False, "watchdog": {"enabled": False}},
            "registry": {"model_name": "itest-stream", "promote": False},
        }
    )
    counts = tmp_path / "rows"
    outcome = run_training(cfg, progress=lambda m: None, callbacks=[_RowsPerEpoch(str(counts))])
    tags = mlflow.MlflowClient().get_run(outcome.run_id).data.tags
    assert tags["skewless.ingest"] == "stream"
    train_rows = int(tags["skewless.train_rows"])
    seen: dict[int, int] = {}
    for rank in (0, 1):
        for line in Path(f"{counts}.{rank}").read_text().splitlines():
            epoch, rows = json.loads(line)
            seen[epoch] = seen.get(epoch, 0) + rows
    # Ray Train's equal split gives both ranks the same count: at most one row is left over
    assert sorted(seen) == [0, 1] and all(train_rows - 1 <= n <= train_rows for n in seen.values()), (seen, train_rows)
    assert outcome.metrics["holdout_auc"] > 0.7, outcome.metrics
