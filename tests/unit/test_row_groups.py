"""The training data stage's pieces, without Ray: Parquet read pieces along row groups, the
stage's Arrow blocks, the streamed epoch's window shuffle, the split's order key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from runtime.data import ORDER_KEY, Piece, plan_pieces, read_piece, split_side, split_unit
from runtime.errors import DataError

LOCAL = pafs.LocalFileSystem()


def _file(path: Path, rows: int, row_group: int, start: int = 0) -> str:
    table = pa.table(
        {"a": np.arange(start, start + rows, dtype=np.int64), "b": np.arange(rows) * 0.5, "c": ["x"] * rows}
    )
    pq.write_table(table, path, row_group_size=row_group)
    return str(path)


def test_pieces_follow_row_groups_in_file_order_and_bound_rows(tmp_path: Path) -> None:
    one = _file(tmp_path / "1.parquet", 1000, 100)
    two = _file(tmp_path / "2.parquet", 250, 100, start=1000)
    pieces = plan_pieces(LOCAL, [one, two], max_rows=300)
    # whole row groups, never across files, at most 300 rows each
    assert [(Path(p.path).name, p.row_groups, p.rows) for p in pieces] == [
        ("1.parquet", (0, 1, 2), 300),
        ("1.parquet", (3, 4, 5), 300),
        ("1.parquet", (6, 7, 8), 300),
        ("1.parquet", (9,), 100),
        ("2.parquet", (0, 1, 2), 250),
    ]
    assert all(p.bytes > 0 for p in pieces)
    # read in order, the pieces give back every row once
    got = np.concatenate([t.column("a").to_numpy() for p in pieces for t in read_piece(LOCAL, p, None)])
    assert np.array_equal(got, np.arange(1250))


def test_a_row_group_larger_than_the_bound_is_a_piece_alone_and_bytes_bound_too(tmp_path: Path) -> None:
    path = _file(tmp_path / "big.parquet", 1000, 500)
    assert [p.row_groups for p in plan_pieces(LOCAL, [path], max_rows=100)] == [(0,), (1,)]
    assert [p.row_groups for p in plan_pieces(LOCAL, [path], max_rows=10_000, max_bytes=1)] == [(0,), (1,)]
    assert [p.row_groups for p in plan_pieces(LOCAL, [path], max_rows=10_000)] == [(0, 1)]


def test_an_empty_file_has_no_pieces(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), path)
    assert plan_pieces(LOCAL, [str(path)]) == []


def test_a_piece_reads_only_the_columns_asked_in_bounded_tables(tmp_path: Path) -> None:
    (piece,) = plan_pieces(LOCAL, [_file(tmp_path / "d.parquet", 1000, 1000)])
    tables = list(read_piece(LOCAL, piece, ["b", "a"], batch_rows=300))
    assert [t.num_rows for t in tables] == [300, 300, 300, 100]
    assert tables[0].column_names == ["b", "a"]
    with pytest.raises(DataError, match=r"no column\(s\) \['nope'\]"):
        list(read_piece(LOCAL, piece, ["a", "nope"]))


def test_a_broken_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet"):
        plan_pieces(LOCAL, [str(bad)])
    with pytest.raises(DataError, match="bad.parquet"):
        list(read_piece(LOCAL, Piece(str(bad), (0,), 1, 1), None))


def test_the_stage_yields_arrow_blocks_with_a_tensor_column_in_bounded_slices() -> None:
    from runtime.data import synthetic_feature_spec
    from runtime.preprocessing import FeatureSpec, fit, transform_batch, transform_batches

    table = pa.table(
        {
            "age": [30.0, 41.0, None, 52.0, 25.0],
            "income": [1e4, 2e4, 3e4, None, 5e4],
            "tenure_months": [1.0, 2.0, 3.0, 4.0, 5.0],
            "support_calls": [0.0, 1.0, 2.0, 3.0, 4.0],
            "plan": ["basic", "pro", None, "basic", "pro"],
            "region": ["eu", "us", "eu", "apac", "us"],
            "device": ["ios", "android", "web", "ios", "web"],
            "churned": [0, 1, 0, 1, 0],
        }
    )
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec()), table)
    blocks = list(transform_batches(table, state=prep.to_json(), rows=2))
    assert [b.num_rows for b in blocks] == [2, 2, 1]
    whole = transform_batch(table, state=prep.to_json())
    from ray.data.block import BlockAccessor

    batches = [BlockAccessor.for_block(b).to_batch_format("numpy") for b in blocks]  # what a consumer gets
    x = np.concatenate([b["x"] for b in batches])
    assert x.shape == (5, prep.output_dim) and x.dtype == np.float32
    assert np.array_equal(x, whole["x"])
    assert np.array_equal(np.concatenate([b["y"] for b in batches]), whole["y"])
    (empty,) = transform_batches(table.slice(0, 0), state=prep.to_json(), rows=2)
    assert empty.num_rows == 0


def test_window_shuffle_yields_every_row_once_in_a_seeded_order() -> None:
    from runtime.training import shuffled_batches

    windows = [{"x": np.arange(n) + start, "y": -(np.arange(n) + start)} for start, n in ((0, 32), (32, 32), (64, 10))]
    batches = list(shuffled_batches(iter(windows), 8, np.random.default_rng(0)))
    assert [len(b["x"]) for b in batches] == [8, 8, 8, 8, 8, 8, 8, 8, 8, 2]
    rows = np.concatenate([b["x"] for b in batches])
    assert sorted(rows.tolist()) == list(range(74))
    assert all(np.array_equal(b["y"], -b["x"]) for b in batches)  # columns stay aligned
    assert set(rows[:32].tolist()) == set(range(32))  # shuffled within a window, not across
    assert not np.array_equal(rows[:32], np.arange(32))
    again = np.concatenate([b["x"] for b in shuffled_batches(iter(windows), 8, np.random.default_rng(0))])
    other = np.concatenate([b["x"] for b in shuffled_batches(iter(windows), 8, np.random.default_rng(1))])
    assert np.array_equal(rows, again) and not np.array_equal(rows, other)


def test_the_order_key_is_a_content_hash_independent_of_the_split() -> None:
    rng = np.random.default_rng(3)
    table = pa.table({"a": rng.normal(size=20_000), "c": rng.choice(["p", "q", "r"], 20_000)})
    side = split_side(table, ["a", "c"], 0.0, 0.0, seed=0, side="train", order_key=True)
    keys = side[ORDER_KEY].to_numpy()
    assert ((keys >= 0) & (keys < 1)).all() and len(np.unique(keys)) == len(keys)
    u = split_unit(table, ["a", "c"], 0)
    assert abs(np.corrcoef(u, keys)[0, 1]) < 0.05  # not the split's number in another guise
    # a row's key depends on its content only
    doubled = split_side(pa.concat_tables([table, table]), ["a", "c"], 0.0, 0.0, 0, "train", order_key=True)
    assert np.array_equal(doubled[ORDER_KEY].to_numpy(), np.concatenate([keys, keys]))
