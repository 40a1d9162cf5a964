"""The streaming split and the bounded fit sample, without Ray."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runtime.data import SyntheticConfig, generate_synthetic, split_unit
from runtime.errors import DataError
from runtime.training import BottomK


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    path = generate_synthetic(tmp_path_factory.mktemp("ingest") / "d.parquet", SyntheticConfig(rows=20_000, seed=4))
    return pq.read_table(path)


def test_split_is_a_function_of_row_content_not_position(table: pa.Table) -> None:
    cols = table.column_names
    u = split_unit(table, cols, seed=0)
    assert u.dtype == np.float64 and ((u >= 0) & (u < 1)).all()
    # the same whatever the chunking, and the same for a row wherever it sits
    chunked = np.concatenate([split_unit(table.slice(i, 777), cols, 0) for i in range(0, table.num_rows, 777)])
    assert np.array_equal(u, chunked)
    perm = np.random.default_rng(0).permutation(table.num_rows)
    assert np.array_equal(split_unit(table.take(perm), cols, 0), u[perm])
    # extra columns and their order do not matter; the chosen columns do
    assert np.array_equal(split_unit(table.select(cols[::-1]), cols, 0), u)
    assert not np.array_equal(split_unit(table, cols[:-1], 0), u)


def test_split_fraction_and_seed(table: pa.Table) -> None:
    cols = table.column_names
    u0, u1 = split_unit(table, cols, 0), split_unit(table, cols, 1)
    for u in (u0, u1):
        assert abs(float(np.mean(u < 0.2)) - 0.2) < 0.015  # 20k rows: 3.5 sigma
    assert float(np.mean((u0 < 0.2) == (u1 < 0.2))) < 0.75  # another seed, another split


def test_duplicate_rows_land_on_the_same_side(table: pa.Table) -> None:
    doubled = pa.concat_tables([table.slice(0, 500), table.slice(0, 500)])
    u = split_unit(doubled, table.column_names, 0)
    assert np.array_equal(u[:500], u[500:])


def test_split_names_a_missing_column(table: pa.Table) -> None:
    with pytest.raises(DataError, match="no column"):
        split_unit(table, ["tenure_months", "nope"], 0)


def test_bottom_k_is_the_k_smallest_in_key_order_whatever_the_arrival_order(table: pa.Table) -> None:
    keys = split_unit(table, table.column_names, 7)
    expect = table.take(np.argsort(keys)[:1500])
    for order in (np.arange(table.num_rows), np.random.default_rng(1).permutation(table.num_rows)):
        sampler = BottomK(1500)
        for i in range(0, table.num_rows, 1000):
            idx = order[i : i + 1000]
            sampler.add(table.take(idx), keys[idx])
            assert sampler._held <= 2 * 1500 + 1000  # bounded: the sample plus one batch
        assert sampler.result().equals(expect)
    small = BottomK(50_000)
    small.add(table, keys)
    assert small.result().num_rows == table.num_rows  # under k: the whole input


def test_bottom_k_of_nothing_is_an_error() -> None:
    with pytest.raises(DataError, match="empty"):
        BottomK(10).result()


def test_streamed_evaluation_equals_whole_table(tmp_path: Path, table: pa.Table) -> None:
    import torch

    from runtime.data import synthetic_feature_spec
    from runtime.models import MLPConfig, build_model
    from runtime.preprocessing import FeatureSpec, fit
    from runtime.registry import load_model_dir, model_json, write_model_dir
    from runtime.tasks import task_for
    from runtime.training import evaluate

    spec = FeatureSpec.model_validate(synthetic_feature_spec("binary"))
    prep = fit(spec, table)
    config = model_json(MLPConfig(hidden=[8]), prep, task_for("binary"))
    torch.manual_seed(0)
    state = build_model(config).state_dict()
    write_model_dir(tmp_path / "m", state, config, prep)
    model = load_model_dir(tmp_path / "m")
    whole = evaluate(model, table)
    streamed = evaluate(model, (table.slice(i, 3000) for i in range(0, table.num_rows, 3000)))
    cuts = [0, 1, 700, 701, 5003, 9000, table.num_rows]  # uneven blocks, one of them a single row
    uneven = evaluate(model, (table.slice(a, b - a) for a, b in itertools.pairwise(cuts)))
    assert whole.keys() == streamed.keys() == {"holdout_accuracy", "holdout_log_loss", "holdout_auc"}
    assert streamed == whole and uneven == whole  # exactly: reproduce compares them bit for bit


def test_holdout_metrics_are_computed_on_one_thread_whatever_the_process_has(tmp_path: Path, table: pa.Table) -> None:
    """``reproduce`` compares holdout metrics exactly, a Ray job's driver and a shell get
    different torch thread counts, and a CPU matmul's sums can depend on the thread count (the
    e2e churn model's log loss moved in the 10th digit): the model runs on one thread."""
    import torch

    from runtime.data import synthetic_feature_spec
    from runtime.models import MLPConfig, build_model
    from runtime.preprocessing import FeatureSpec, fit
    from runtime.registry import load_model_dir, model_json, write_model_dir
    from runtime.tasks import task_for
    from runtime.training import evaluate

    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec("binary")), table)
    config = model_json(MLPConfig(hidden=[8]), prep, task_for("binary"))
    torch.manual_seed(0)
    write_model_dir(tmp_path / "m", build_model(config).state_dict(), config, prep)
    model = load_model_dir(tmp_path / "m")
    seen: list[int] = []
    predict = model.predict_table

    def recording(batch: pa.Table) -> object:
        seen.append(torch.get_num_threads())
        return predict(batch)

    model.predict_table = recording  # type: ignore[method-assign]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        metrics = evaluate(model, (table.slice(i, 5000) for i in range(0, table.num_rows, 5000)))
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2  # and the process keeps its setting
    finally:
        torch.set_num_threads(before)
    assert set(metrics) == {"holdout_accuracy", "holdout_log_loss", "holdout_auc"}


def test_split_is_the_same_whatever_the_types_a_block_gives_a_value() -> None:
    """A block with a null in an int column reads as float, a dictionary-encoded one as a
    dictionary: the same row must land on the same side, with the same order key."""
    from runtime.data import ORDER_KEY, split_side

    rows = {"x": [3, 4, None, 7], "c": ["a", "b", "a", None], "y": [1, 0, 1, 1]}
    whole = pa.table(rows)
    cut = [pa.table({k: v[:2] for k, v in rows.items()}), pa.table({k: v[2:] for k, v in rows.items()})]
    recoded = pa.table({"x": pa.array([3.0, 4.0]), "c": pa.array(["a", "b"]).dictionary_encode(), "y": [1, 0]})
    u_whole = split_unit(whole, ["x", "c", "y"], 0)
    assert np.array_equal(np.concatenate([split_unit(t, ["x", "c", "y"], 0) for t in cut]), u_whole)
    assert np.array_equal(split_unit(recoded, ["x", "c", "y"], 0), u_whole[:2])
    side = split_side(whole, ["x", "c", "y"], 0.5, 0.0, seed=0, side="train", order_key=True)
    parts = [split_side(t, ["x", "c", "y"], 0.5, 0.0, seed=0, side="train", order_key=True) for t in cut]
    keys = np.concatenate([t[ORDER_KEY].to_numpy() for t in parts])
    assert sorted(keys) == sorted(side[ORDER_KEY].to_numpy())
