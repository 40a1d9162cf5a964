from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from runtime.data import (
    SyntheticConfig,
    dataset_fingerprint,
    generate_synthetic,
    generate_text,
    read_table,
    table_fingerprint,
)
from runtime.errors import ConfigError, DataError, DatasetNotFoundError


def test_generator_is_deterministic_and_chunked(tmp_path):
    a = generate_synthetic(tmp_path / "a.parquet", SyntheticConfig(rows=2500, seed=3, chunk_rows=1000))
    b = generate_synthetic(tmp_path / "b.parquet", SyntheticConfig(rows=2500, seed=3, chunk_rows=1000))
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.num_rows == 2500
    assert ta.equals(tb)
    assert pq.ParquetFile(a).metadata.num_row_groups == 3  # written in bounded chunks
    assert dataset_fingerprint(a) != "" and table_fingerprint(ta) == table_fingerprint(tb)


def test_generator_has_nulls_signal_and_shift(tmp_path):
    base = pq.read_table(generate_synthetic(tmp_path / "base.parquet", SyntheticConfig(rows=20_000, seed=1)))
    assert base["age"].null_count > 0 and base["region"].null_count > 0
    churn = base["churned"].to_numpy()
    assert 0.2 < churn.mean() < 0.8
    calls = base["support_calls"].to_numpy(zero_copy_only=False)
    # learnable signal: more support calls, more churn
    import numpy as np

    hi = churn[np.nan_to_num(calls) >= 3].mean()
    lo = churn[np.nan_to_num(calls) == 0].mean()
    assert hi > lo + 0.1
    shifted = pq.read_table(
        generate_synthetic(tmp_path / "s.parquet", SyntheticConfig(rows=20_000, seed=1, shift={"age": 1.0}))
    )
    assert pa.compute.mean(shifted["age"]).as_py() > pa.compute.mean(base["age"]).as_py() + 5


@pytest.mark.parametrize("task,label", [("multiclass", "segment"), ("regression", "monthly_spend")])
def test_generator_tasks(tmp_path, task, label):
    t = pq.read_table(generate_synthetic(tmp_path / "t.parquet", SyntheticConfig(rows=3000, task=task)))
    assert label in t.column_names
    if task == "multiclass":
        assert set(t[label].to_pylist()) == {0, 1, 2}


def test_generator_rejects_bad_config():
    with pytest.raises(ConfigError, match="shift names unknown columns"):
        SyntheticConfig(shift={"nope": 1.0})
    with pytest.raises(ConfigError, match="rows"):
        SyntheticConfig(rows=0)


def test_fingerprint_covers_every_byte(tmp_path):
    t = pa.table({"x": list(range(100_000)), "y": [float(i) for i in range(100_000)]})
    p1, p2 = tmp_path / "one.parquet", tmp_path / "two.parquet"
    pq.write_table(t, p1)
    changed = t.set_column(1, "y", pa.array([float(i) for i in range(99_999)] + [-1.0]))
    pq.write_table(changed, p2)
    assert dataset_fingerprint(str(p1)) != dataset_fingerprint(str(p2))  # last row only
    assert table_fingerprint(t) != table_fingerprint(changed)
    # same content, different chunking -> same table fingerprint
    rechunked = pa.concat_tables([t.slice(0, 10), t.slice(10)])
    assert table_fingerprint(rechunked) == table_fingerprint(t)


def test_read_directory_csv_and_uri(tmp_path):
    t = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(t.slice(0, 2), d / "part-0.parquet")
    pq.write_table(t.slice(2), d / "part-1.parquet")
    (d / "_SUCCESS").write_text("")
    assert read_table(str(d)).to_pylist() == t.to_pylist()
    assert read_table(d.as_uri()).to_pylist() == t.to_pylist()
    fp = dataset_fingerprint(str(d))
    assert fp == dataset_fingerprint(d.as_uri())
    pacsv.write_csv(t, tmp_path / "t.csv")
    assert read_table(str(tmp_path / "t.csv")).to_pylist() == t.to_pylist()


def test_missing_and_unreadable_datasets_name_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nope.parquet"):
        read_table(str(tmp_path / "nope.parquet"))
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        read_table(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no .parquet or .csv"):
        read_table(str(tmp_path / "empty"))


def test_generate_text_writes_bounded_chunks(tmp_path, monkeypatch: pytest.MonkeyPatch):
    from runtime.data import _text

    sizes: list[int] = []
    real = _text._chunk

    def spy(seed: int, index: int) -> bytes:
        sizes.append(len(data := real(seed, index)))
        return data

    monkeypatch.setattr(_text, "_chunk", spy)
    generate_text(tmp_path / "big.txt", 600_000, seed=0)
    assert len(sizes) > 3 and max(sizes) < 256 * 1024  # memory is one chunk, whatever the size
