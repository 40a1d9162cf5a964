"""runtime.preprocessing: the spec, every transform, validation errors, persistence, fingerprints."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import runtime.preprocessing as prep
from runtime.errors import ConfigError, PreprocessingError, SchemaValidationError
from runtime.preprocessing import (
    FeatureSpec,
    FittedPreprocessor,
    NumericFeature,
    code_fingerprint,
    fit,
    load_spec,
)

SPEC_YAML = """\
label: {name: churned, task: binary}
features:
  - name: age
    type: numeric
    clip: [0, 120]
    bucketize: [18, 30, 50]
  - name: income
    type: numeric
    impute: median
    clip: [0, null]
    log1p: true
  - name: city
    type: categorical
  - name: score
    type: passthrough
"""


def spec_of(*features: dict[str, Any], label: dict[str, Any] | None = None) -> FeatureSpec:
    doc: dict[str, Any] = {"features": list(features)}
    if label is not None:
        doc["label"] = label
    return FeatureSpec.model_validate(doc)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def raises_schema(fn: Any, *args: Any) -> SchemaValidationError:
    with pytest.raises(SchemaValidationError) as info:
        fn(*args)
    return info.value


# --------------------------------------------------------------------------- public surface


def test_public_surface_is_locked() -> None:
    assert sorted(prep.__all__) == [
        "CategoricalFeature",
        "FEATURES",
        "FeatureSpec",
        "FittedPreprocessor",
        "LABEL",
        "LabelSpec",
        "NumericFeature",
        "PassthroughFeature",
        "code_fingerprint",
        "features_and_labels",
        "fit",
        "input_schema_of",
        "load_spec",
        "package_files",
        "source_fingerprint",
        "transform_batch",
        "transform_batches",
    ]


def test_import_does_not_pull_the_training_stack() -> None:
    code = (
        "import json, sys; import runtime.preprocessing; "
        "print(json.dumps(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas', 'sklearn') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


# --------------------------------------------------------------------------- the spec


def test_load_spec_fills_defaults(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC_YAML)
    spec = load_spec(path)
    assert spec == FeatureSpec.from_yaml(path)
    age = spec.features[0]
    assert isinstance(age, NumericFeature)
    assert (age.nullable, age.allow_nonfinite, age.impute, age.standardize) == (True, False, "mean", True)
    assert age.clip == (0.0, 120.0) and age.bucketize == (18.0, 30.0, 50.0)
    assert spec.label is not None and spec.label.task == "binary"
    assert FeatureSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"featurs": [{"name": "a", "type": "numeric"}]}, ["featurs", "did you mean 'features'"]),
        (
            {"features": [{"name": "a", "type": "numeric", "imput": "mean"}]},
            ["features[0].imput", "unknown key 'imput'", "did you mean 'impute'"],
        ),
        (
            {"features": [{"name": "a", "type": "categorical", "min_freq": 2}]},
            ["features[0].min_freq", "did you mean 'min_frequency'"],
        ),
        (
            {"label": {"name": "y", "tsk": "binary"}, "features": [{"name": "a", "type": "numeric"}]},
            ["label.tsk", "did you mean 'task'"],
        ),
        ({"features": [{"name": "a", "type": "numerc"}]}, ["features[0].type", "'numerc'", "did you mean 'numeric'"]),
        (
            {"features": [{"name": "a", "type": "numeric", "impute": "meen"}]},
            ["features[0].impute", "'meen'", "'mean', 'median' or 'constant'"],
        ),
    ],
)
def test_spec_errors_name_path_value_and_hint(doc: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        FeatureSpec.model_validate(doc)
    for text in expected:
        assert text in str(info.value)


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        ({"impute": "constant"}, "impute_value is required when impute is 'constant'"),
        ({"impute_value": 1.0}, "only used with impute: constant"),
        ({"clip": [5, 1]}, "clip min (5.0) must be <= clip max (1.0)"),
        ({"bucketize": [1, 1]}, "strictly increasing"),
        ({"bucketize": []}, "features[0].bucketize"),
        ({"impute": "constant", "impute_value": -3, "log1p": True}, "must be > -1 for log1p"),
    ],
)
def test_numeric_rules_are_config_errors(feature: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match="invalid feature spec") as info:
        spec_of({"name": "a", "type": "numeric", **feature})
    assert expected in str(info.value)


def test_names_must_be_unique() -> None:
    with pytest.raises(ConfigError, match="declared twice"):
        spec_of({"name": "a", "type": "numeric"}, {"name": "a", "type": "categorical"})
    with pytest.raises(ConfigError, match="also a feature name"):
        spec_of({"name": "a", "type": "numeric"}, label={"name": "a", "task": "binary"})


def test_spec_file_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("features: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_spec(bad)
    bad.write_text("features:\n  - {name: a, type: numeric, standardise: true}\n")
    with pytest.raises(ConfigError) as info:
        load_spec(bad)
    assert str(info.value) == (
        f"invalid feature spec {str(bad)!r}: features[0].standardise: unknown key 'standardise' "
        "(did you mean 'standardize'?)"
    )


# --------------------------------------------------------------------------- numeric


def test_numeric_mean_impute_and_standardize() -> None:
    spec = spec_of({"name": "x", "type": "numeric"})
    table = pa.table({"x": [1.0, None, 3.0, 8.0]})
    fp = fit(spec, table)
    mean = (1 + 3 + 8) / 3
    filled = np.array([1.0, mean, 3.0, 8.0])
    state = fp.state["features"]["x"]
    assert state["impute_value"] == pytest.approx(mean)
    assert state["mean"] == pytest.approx(filled.mean()) and state["std"] == pytest.approx(filled.std())
    out = fp.transform(table)
    assert out.dtype == np.float32 and out.shape == (4, 1) and out.flags.c_contiguous
    np.testing.assert_allclose(out[:, 0], (filled - filled.mean()) / filled.std(), rtol=1e-6)
    assert fp.feature_names == ["x"] and fp.output_dim == 1


def test_numeric_median_constant_and_no_standardize() -> None:
    spec = spec_of(
        {"name": "m", "type": "numeric", "impute": "median", "standardize": False},
        {"name": "c", "type": "numeric", "impute": "constant", "impute_value": -7, "standardize": False},
    )
    table = pa.table({"m": [1.0, 2.0, 100.0, None], "c": pa.array([None, 5, None, 1], pa.int32())})
    out = fit(spec, table).transform(table)
    np.testing.assert_array_equal(out, np.array([[1, -7], [2, 5], [100, -7], [2, 1]], dtype=np.float32))


def test_constant_column_has_unit_std() -> None:
    fp = fit(spec_of({"name": "x", "type": "numeric"}), pa.table({"x": [4.0, 4.0]}))
    assert fp.state["features"]["x"]["std"] == 1.0
    np.testing.assert_array_equal(fp.transform(pa.table({"x": [4.0, 6.0]}))[:, 0], [0.0, 2.0])


def test_clip_then_log1p_then_standardize() -> None:
    spec = spec_of({"name": "x", "type": "numeric", "impute": "median", "clip": [0, 100], "log1p": True})
    table = pa.table({"x": [-5.0, 3.0, None, 1000.0]})
    fp = fit(spec, table)
    assert fp.state["features"]["x"]["impute_value"] == 3.0  # median of the raw values
    logged = np.log1p(np.array([0.0, 3.0, 3.0, 100.0]))  # clipped, imputed, logged
    state = fp.state["features"]["x"]
    assert state["mean"] == pytest.approx(logged.mean()) and state["std"] == pytest.approx(logged.std())
    np.testing.assert_allclose(fp.transform(table)[:, 0], (logged - logged.mean()) / logged.std(), rtol=1e-6)


def test_bucketize_is_one_hot_and_ignores_standardize() -> None:
    spec = spec_of(
        {"name": "age", "type": "numeric", "impute": "constant", "impute_value": 40, "bucketize": [18, 30, 50]}
    )
    fp = fit(spec, pa.table({"age": [1.0, 2.0]}))
    assert fp.feature_names == ["age_bucket_0", "age_bucket_1", "age_bucket_2", "age_bucket_3"]
    out = fp.transform(pa.table({"age": [5.0, 18.0, 29.9, 30.0, None, 50.0, 99.0]}))
    np.testing.assert_array_equal(out.argmax(axis=1), [0, 1, 1, 2, 2, 3, 3])  # x == boundary goes up
    np.testing.assert_array_equal(out.sum(axis=1), np.ones(7))
    assert "mean" not in fp.state["features"]["age"]


def test_nonfinite_when_allowed_passes_through() -> None:
    spec = spec_of(
        {"name": "x", "type": "numeric", "allow_nonfinite": True, "clip": [None, 10], "standardize": False},
        {
            "name": "b",
            "type": "numeric",
            "allow_nonfinite": True,
            "bucketize": [0.0],
            "impute": "constant",
            "impute_value": 5,
        },
        {"name": "p", "type": "passthrough", "allow_nonfinite": True},
    )
    table = pa.table(
        {
            "x": [math.nan, math.inf, -math.inf, 1.0],
            "b": [math.nan, math.inf, -math.inf, None],
            "p": [math.inf, None, math.nan, 2.0],
        }
    )
    fp = fit(spec, table)
    assert fp.state["features"]["x"]["impute_value"] == 1.0  # statistics skip NaN / inf
    out = fp.transform(table)
    assert np.isnan(out[0, 0]) and out[1, 0] == 10.0 and out[2, 0] == -np.inf
    np.testing.assert_array_equal(out[:, 1:3], [[0, 0], [0, 1], [1, 0], [0, 1]])  # NaN: no bucket
    assert out[0, 3] == np.inf and np.isnan(out[1, 3]) and np.isnan(out[2, 3]) and out[3, 3] == 2.0


def test_passthrough_casts_and_nulls_become_nan() -> None:
    fp = fit(spec_of({"name": "p", "type": "passthrough"}), pa.table({"p": pa.array([1, None, 3], pa.int64())}))
    out = fp.transform(pa.table({"p": [0.1, None, 1e39]}))
    assert out[0, 0] == np.float32(0.1) and np.isnan(out[1, 0]) and out[2, 0] == np.inf


# --------------------------------------------------------------------------- categorical


def test_categorical_vocabulary_order_oov_and_nulls() -> None:
    spec = spec_of({"name": "city", "type": "categorical"})
    table = pa.table({"city": ["rome", "paris", None, "paris", "oslo", "rome", "paris"]})
    fp = fit(spec, table)
    assert fp.state["features"]["city"]["vocabulary"] == ["paris", "rome", "oslo"]  # count desc, value asc
    assert fp.feature_names == ["city=<oov>", "city=paris", "city=rome", "city=oslo"]
    out = fp.transform(pa.table({"city": ["oslo", "berlin", None, "paris"]}))
    np.testing.assert_array_equal(out, np.array([[0, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], np.float32))


def test_min_frequency_max_categories_and_ties() -> None:
    table = pa.table({"c": ["b", "a", "b", "a", "c", "d", "d", "e"]})
    fp = fit(spec_of({"name": "c", "type": "categorical", "min_frequency": 2}), table)
    assert fp.state["features"]["c"]["vocabulary"] == ["a", "b", "d"]
    fp = fit(spec_of({"name": "c", "type": "categorical", "max_categories": 2}), table)
    assert fp.state["features"]["c"]["vocabulary"] == ["a", "b"]  # ties broken by value
    fp = fit(spec_of({"name": "c", "type": "categorical", "min_frequency": 5}), table)
    assert fp.state["features"]["c"]["vocabulary"] == [] and fp.output_dim == 1
    assert fp.transform(table).sum() == 8.0  # everything is OOV


def test_index_encoding_and_several_categoricals_sharing_values() -> None:
    spec = spec_of(
        {"name": "a", "type": "categorical", "encoding": "index"},
        {"name": "b", "type": "categorical"},
        {"name": "n", "type": "numeric", "standardize": False},
        {"name": "c", "type": "categorical", "encoding": "index"},
    )
    table = pa.table({"a": ["x", "y", "y"], "b": ["y", "z", "y"], "n": [1.0, 2.0, 3.0], "c": ["z", "z", "x"]})
    fp = fit(spec, table)
    assert fp.feature_names == ["a", "b=<oov>", "b=y", "b=z", "n", "c"]
    out = fp.transform(
        pa.table({"a": ["y", "q", None], "b": ["z", "x", "y"], "n": [0.0, 0.0, 0.0], "c": ["x", "z", "y"]})
    )
    np.testing.assert_array_equal(
        out, np.array([[1, 0, 0, 1, 0, 2], [0, 1, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]], dtype=np.float32)
    )


def test_string_types_and_chunks_are_accepted() -> None:
    spec = spec_of({"name": "c", "type": "categorical"}, {"name": "x", "type": "numeric"})
    base = pa.table({"c": ["a", "b", "a", None], "x": [1.0, 2.0, 3.0, 4.0]})
    fp = fit(spec, base)
    expected = fp.transform(base)
    variants = [
        pa.table({"c": pa.array(["a", "b", "a", None], pa.large_string()), "x": pa.array([1, 2, 3, 4], pa.int8())}),
        pa.table({"c": pa.array(["a", "b", "a", None]).dictionary_encode(), "x": pa.array([1, 2, 3, 4], pa.float32())}),
        pa.concat_tables([base.slice(0, 1), base.slice(1, 2), base.slice(3)]),
        base.append_column("extra", pa.array(["ignored"] * 4)).select(["extra", "x", "c"]),
    ]
    for table in variants:
        assert same_bits(fp.transform(table), expected)


def test_categorical_only_and_empty_tables() -> None:
    fp = fit(spec_of({"name": "c", "type": "categorical", "encoding": "index"}), pa.table({"c": ["a"]}))
    assert fp.transform(pa.table({"c": pa.array([], pa.string())})).shape == (0, 1)
    assert fp.transform_records([]).shape == (0, 1)
    fp = fit(spec_of({"name": "x", "type": "numeric"}), pa.table({"x": [1.0]}))
    assert fp.transform_records([]).shape == (0, 1)
    with pytest.raises(PreprocessingError, match="no rows"):
        fit(spec_of({"name": "x", "type": "numeric"}), pa.table({"x": pa.array([], pa.float64())}))
    with pytest.raises(PreprocessingError, match="impute: constant"):
        fit(spec_of({"name": "x", "type": "numeric"}), pa.table({"x": pa.array([None], pa.float64())}))


# --------------------------------------------------------------------------- validation


@pytest.fixture
def fitted() -> FittedPreprocessor:
    spec = spec_of(
        {"name": "age", "type": "numeric", "nullable": False},
        {"name": "inc", "type": "numeric", "log1p": True},
        {"name": "city", "type": "categorical", "nullable": False},
        {"name": "score", "type": "passthrough", "nullable": False},
    )
    return fit(spec, pa.table({"age": [30.0, 40.0], "inc": [1.0, 2.0], "city": ["a", "b"], "score": [0.5, 0.7]}))


def good_rows(n: int = 5) -> dict[str, list[Any]]:
    return {"age": [30.0] * n, "inc": [1.0] * n, "city": ["a"] * n, "score": [0.1] * n}


def test_nonfinite_message_names_column_row_value_rule(fitted: FittedPreprocessor) -> None:
    cols = good_rows()
    cols["age"][3] = math.nan
    err = raises_schema(fitted.transform, pa.table(cols))
    assert str(err) == "column 'age', row 3: value nan breaks rule: must be finite (allow_nonfinite: false)"
    assert (err.column, err.row, err.rule) == ("age", 3, "must be finite (allow_nonfinite: false)")
    assert err.to_dict()["field"] == "age"
    cols["age"][3], cols["score"][1] = 1.0, -math.inf
    err = raises_schema(fitted.validate, pa.table(cols))
    assert (err.column, err.row, err.value) == ("score", 1, -math.inf)


@pytest.mark.parametrize("column", ["age", "city", "score"])
def test_null_in_non_nullable_column(fitted: FittedPreprocessor, column: str) -> None:
    cols = good_rows()
    cols[column][2] = None
    for fn, arg in (
        (fitted.transform, pa.table(cols)),
        (fitted.transform_records, pa.table(cols).to_pylist()),
        (fitted.validate, pa.table(cols)),
    ):
        err = raises_schema(fn, arg)
        assert (err.column, err.row, err.value, err.rule) == (column, 2, None, "must not be null (nullable: false)")


def test_missing_column(fitted: FittedPreprocessor) -> None:
    cols = good_rows()
    del cols["city"]
    err = raises_schema(fitted.transform, pa.table(cols))
    assert (err.column, err.row, err.value, err.rule) == ("city", None, None, "required column is missing")
    assert "all rows" in str(err)
    records = pa.table(good_rows()).to_pylist()
    del records[4]["inc"]
    err = raises_schema(fitted.transform_records, records)
    assert (err.column, err.row, err.value) == ("inc", 4, None) and "missing" in err.rule


def test_wrong_column_types_in_tables(fitted: FittedPreprocessor) -> None:
    cols: dict[str, Any] = good_rows()
    cols["age"] = pa.array([None, "x", "y", "z", "w"])
    err = raises_schema(fitted.transform, pa.table(cols))
    assert (err.column, err.row, err.value) == ("age", 1, "x") and err.rule.startswith("expected a number")
    cols = good_rows()
    cols["city"] = [1, 2, 3, 4, 5]
    err = raises_schema(fitted.validate, pa.table(cols))
    assert (err.column, err.row, err.value) == ("city", 0, 1) and err.rule.startswith("expected a string")
    cols = good_rows()
    cols["inc"] = [True, False, True, True, True]
    err = raises_schema(fitted.transform, pa.table(cols))
    assert (err.column, err.row, err.value) == ("inc", 0, True)
    cols = good_rows()
    cols["inc"] = pa.array([1, 2**60, 3, 4, 5], pa.int64())
    err = raises_schema(fitted.transform, pa.table(cols))
    assert (err.column, err.row, err.value) == ("inc", 1, 2**60) and "2**53" in err.rule


@pytest.mark.parametrize(
    ("column", "value", "rule"),
    [
        ("age", True, "expected a number (int or float), got bool"),
        ("age", "31", "expected a number (int or float), got str"),
        ("score", [1.0], "expected a number (int or float), got list"),
        ("city", 7, "expected a string, got int"),
        ("city", False, "expected a string, got bool"),
        ("city", b"a", "expected a string, got bytes"),
        ("inc", 2**60, "expected a number (int or float); an integer must be within ±2**53 to be exact in float64"),
        ("inc", -(2**70), "expected a number (int or float); an integer must be within ±2**53 to be exact in float64"),
    ],
)
def test_wrong_types_in_records(fitted: FittedPreprocessor, column: str, value: Any, rule: str) -> None:
    records = pa.table(good_rows()).to_pylist()
    records[3][column] = value
    err = raises_schema(fitted.records_to_table, records)
    assert (err.column, err.row, err.value, err.rule) == (column, 3, value, rule)


def test_records_accept_ints_numpy_scalars_and_ignore_extra_keys(fitted: FittedPreprocessor) -> None:
    rows = [{"age": 30, "inc": np.float32(1.5), "city": "a", "score": np.int64(2), "other": object()}]
    table = fitted.records_to_table(rows)
    assert table.schema == fitted.input_schema
    assert table.to_pylist() == [{"age": 30.0, "inc": 1.5, "city": "a", "score": 2.0}]
    with pytest.raises(PreprocessingError, match="list of objects"):
        fitted.transform_records({"age": 1})  # type: ignore[arg-type]
    err = raises_schema(fitted.transform_records, [rows[0], "nope"])
    assert err.row == 1


def test_log1p_domain_error(fitted: FittedPreprocessor) -> None:
    cols = good_rows()
    cols["inc"][2] = -1.0
    err = raises_schema(fitted.transform, pa.table(cols))
    assert (err.column, err.row, err.value) == ("inc", 2, -1.0) and "log1p" in err.rule


def test_input_schema(fitted: FittedPreprocessor) -> None:
    assert fitted.input_schema == pa.schema(
        [
            pa.field("age", pa.float64(), nullable=False),
            pa.field("inc", pa.float64()),
            pa.field("city", pa.string(), nullable=False),
            pa.field("score", pa.float64(), nullable=False),
        ]
    )
    assert prep.input_schema_of(fitted.spec) == fitted.input_schema


# --------------------------------------------------------------------------- labels


def test_binary_and_multiclass_labels() -> None:
    spec = spec_of({"name": "x", "type": "numeric"}, label={"name": "y", "task": "binary"})
    table = pa.table({"x": [1.0, 2.0, 3.0], "y": ["yes", "no", "yes"]})
    fp = fit(spec, table)
    assert fp.classes == ["no", "yes"]
    labels = fp.transform_label(table)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0, 1]
    assert fp.transform(table.drop_columns(["y"])).shape == (3, 1)  # serving never has labels
    err = raises_schema(fp.transform_label, pa.table({"y": ["no", "maybe"]}))
    assert (err.column, err.row, err.value) == ("y", 1, "maybe") and "unknown class" in err.rule
    err = raises_schema(fp.transform_label, pa.table({"y": ["no", None]}))
    assert (err.column, err.row, err.value) == ("y", 1, None)
    err = raises_schema(fp.transform_label, pa.table({"y": [1, 0]}))
    assert err.column == "y" and "string" in err.rule
    err = raises_schema(fp.transform_label, pa.table({"x": [1.0]}))
    assert err.rule == "required column is missing"
    with pytest.raises(PreprocessingError, match="task: multiclass"):
        fit(spec, pa.table({"x": [1.0, 2.0, 3.0], "y": ["a", "b", "c"]}))

    spec = spec_of({"name": "x", "type": "numeric"}, label={"name": "y", "task": "multiclass"})
    fp = fit(spec, pa.table({"x": [1.0, 2.0, 3.0, 4.0], "y": pa.array([3, 1, None, 2], pa.int32())}))
    assert fp.classes == [1, 2, 3]
    assert fp.transform_label(pa.table({"y": [2, 3, 1]})).tolist() == [1, 2, 0]
    assert FittedPreprocessor.from_json(fp.to_json()).classes == [1, 2, 3]


def test_regression_label_and_missing_label_spec() -> None:
    spec = spec_of({"name": "x", "type": "numeric"}, label={"name": "y", "task": "regression"})
    table = pa.table({"x": [1.0, 2.0], "y": [0.5, 3]})
    fp = fit(spec, table)
    assert fp.classes is None
    out = fp.transform_label(table)
    assert out.dtype == np.float32 and out.tolist() == [0.5, 3.0]
    err = raises_schema(fp.transform_label, pa.table({"y": [1.0, math.nan]}))
    assert (err.column, err.row) == ("y", 1)
    with pytest.raises(SchemaValidationError, match="required column is missing"):
        fit(spec, table.drop_columns(["y"]))
    fp = fit(spec_of({"name": "x", "type": "numeric"}), table)
    with pytest.raises(PreprocessingError, match="no label"):
        fp.transform_label(table)


# --------------------------------------------------------------------------- persistence, fingerprints


def mixed_fit() -> tuple[FittedPreprocessor, pa.Table]:
    spec = spec_of(
        {"name": "a", "type": "numeric", "impute": "median", "clip": [0.1, None], "log1p": True},
        {"name": "b", "type": "numeric", "bucketize": [-1.5, 0.25, 3]},
        {"name": "c", "type": "categorical", "min_frequency": 2},
        {"name": "d", "type": "categorical", "encoding": "index"},
        {"name": "e", "type": "passthrough"},
        label={"name": "y", "task": "binary"},
    )
    rng = np.random.default_rng(7)
    n = 200
    table = pa.table(
        {
            "a": pa.array(rng.lognormal(size=n) / 3, mask=rng.random(n) < 0.1),
            "b": pa.array(rng.normal(size=n) * 3, mask=rng.random(n) < 0.1),
            "c": pa.array(rng.choice(["u", "v", "w", "x", "rare"], size=n, p=[0.4, 0.3, 0.2, 0.095, 0.005]).tolist()),
            "d": pa.array(rng.choice(["p", "q"], size=n).tolist(), mask=rng.random(n) < 0.2),
            "e": pa.array(rng.normal(size=n) / 7, mask=rng.random(n) < 0.1),
            "y": pa.array(rng.choice([True, False], size=n)),
        }
    )
    return fit(spec, table), table


def test_json_round_trip_is_bit_identical() -> None:
    fp, table = mixed_fit()
    text = fp.to_json()
    json.loads(text)  # plain JSON
    json.dumps(fp.state, allow_nan=False)  # no numpy types, no NaN
    loaded = FittedPreprocessor.from_json(text)
    assert loaded.state == fp.state and loaded.spec == fp.spec
    assert (loaded.fingerprint, loaded.code_fingerprint) == (fp.fingerprint, fp.code_fingerprint)
    assert loaded.feature_names == fp.feature_names and loaded.classes == fp.classes == [False, True]
    assert same_bits(loaded.transform(table), fp.transform(table))
    assert np.array_equal(loaded.transform_label(table), fp.transform_label(table))
    assert loaded.to_json() == text
    assert repr(loaded).startswith("FittedPreprocessor(features=5, output_dim=")


def test_from_json_rejects_edits_and_garbage() -> None:
    fp, _ = mixed_fit()
    doc = json.loads(fp.to_json())
    doc["state"]["features"]["b"]["impute_value"] += 1e-12
    with pytest.raises(PreprocessingError, match="edited or corrupted"):
        FittedPreprocessor.from_json(json.dumps(doc))
    with pytest.raises(PreprocessingError, match="not valid JSON"):
        FittedPreprocessor.from_json("{")
    with pytest.raises(PreprocessingError, match="not a fitted preprocessor"):
        FittedPreprocessor.from_json("{}")
    doc = json.loads(fp.to_json())
    del doc["state"]["features"]["c"]
    with pytest.raises(PreprocessingError, match="does not match the spec at feature 'c'"):
        FittedPreprocessor.from_json(json.dumps(doc))
    doc = json.loads(fp.to_json())
    doc["format_version"] = 99
    with pytest.raises(PreprocessingError, match="format_version 99"):
        FittedPreprocessor.from_json(json.dumps(doc))


def test_fingerprint_tracks_spec_state_and_recorded_code() -> None:
    fp, table = mixed_fit()
    assert fit(fp.spec, table).fingerprint == fp.fingerprint  # stable
    assert fp.code_fingerprint == code_fingerprint()
    other_state = fit(fp.spec, table.slice(0, 150))
    assert other_state.fingerprint != fp.fingerprint
    doc = fp.spec.model_dump(mode="json")
    doc["features"][4]["allow_nonfinite"] = True  # same state, different spec
    other_spec = FittedPreprocessor(FeatureSpec.model_validate(doc), fp.state)
    assert other_spec.state == fp.state and other_spec.fingerprint != fp.fingerprint
    old_code = FittedPreprocessor(fp.spec, fp.state, code_fingerprint="0" * 64)
    assert old_code.fingerprint != fp.fingerprint
    loaded = FittedPreprocessor.from_json(old_code.to_json())
    assert loaded.code_fingerprint == "0" * 64 != code_fingerprint()  # kept for the loader to compare


def test_state_is_a_copy() -> None:
    fp, table = mixed_fit()
    before = fp.transform(table)
    fp.state["features"]["b"]["impute_value"] = 1e9
    assert same_bits(fp.transform(table), before)


def test_code_fingerprint_is_stable_and_covers_what_the_code_does(tmp_path: Path) -> None:
    from runtime.preprocessing import package_files, source_fingerprint

    package = Path(prep.__file__).parent
    assert code_fingerprint() == code_fingerprint() == source_fingerprint(package_files(package))
    assert len(code_fingerprint()) == 64
    copy = tmp_path / "runtime" / "preprocessing"
    shutil.copytree(package, copy)

    def copied() -> str:
        return source_fingerprint(package_files(copy), root=tmp_path)

    assert copied() == code_fingerprint()
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "junk.py").write_text("x = 1\n")
    assert copied() == code_fingerprint()
    ops = copy / "_ops.py"
    original = ops.read_text()
    # comments, blank lines and docstrings are not code: the fingerprint stays
    ops.write_text("# a comment\n" + original.replace('"""', '"""Reworded. ', 1) + "\n\n# trailing\n")
    assert copied() == code_fingerprint()
    # a changed expression is new code
    ops.write_text(original + "\n\ndef _added(x):\n    return x + 1\n")
    assert copied() != code_fingerprint()


def test_fit_arguments_are_checked() -> None:
    spec = spec_of({"name": "x", "type": "numeric"})
    table = pa.table({"x": [1.0, 2.0]})
    with pytest.raises(PreprocessingError, match="FeatureSpec"):
        fit({"features": []}, table)  # type: ignore[arg-type]
    with pytest.raises(PreprocessingError, match=r"pyarrow\.Table"):
        fit(spec, {"x": [1.0]})  # type: ignore[arg-type]
    with pytest.raises(PreprocessingError, match=r"pyarrow\.Table"):
        fit(spec, table).transform({"x": [1.0]})  # type: ignore[arg-type]


def test_state_must_be_plain_json_and_match_the_spec() -> None:
    spec = spec_of({"name": "x", "type": "numeric"})
    good = {"features": {"x": {"impute_value": 1.0, "mean": 0.0, "std": 1.0}}, "label": None}
    assert FittedPreprocessor(spec, good).output_dim == 1
    with pytest.raises(PreprocessingError, match="not plain JSON"):
        FittedPreprocessor(spec, {"features": {"x": {"impute_value": np.float32(1.0)}}, "label": None})
    with pytest.raises(PreprocessingError, match="must be an object"):
        FittedPreprocessor(spec, {"features": [], "label": None})
    with pytest.raises(PreprocessingError, match="at feature 'x'"):
        FittedPreprocessor(spec, {"features": {"x": {"impute_value": 1.0}}, "label": None})


def test_spec_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC_YAML)
    spec = load_spec(path)
    again = tmp_path / "again.yaml"
    again.write_text(spec.to_yaml())
    assert load_spec(again) == spec


def test_signed_zeros_at_clip_bounds_are_the_same_online_and_in_batch() -> None:
    # numpy picks different loops for one row and for many; signed zeros at a clip bound
    # are where such loops could disagree
    spec = spec_of(
        {"name": "a", "type": "numeric", "clip": [0, None], "standardize": False},
        {"name": "b", "type": "numeric", "clip": [None, -0.0], "standardize": False},
        {"name": "c", "type": "numeric", "clip": [-0.0, 0.0], "log1p": True},
    )
    fp = fit(spec, pa.table({"a": [1.0, 2.0], "b": [1.0, 2.0], "c": [1.0, 0.0]}))
    for n in (1, 3, 17, 1000):
        values = [-0.0, 0.0] * n
        table = pa.table({"a": values[:n], "b": values[1 : n + 1], "c": values[:n]})
        batch = fp.transform(table)
        assert same_bits(fp.transform_records(table.to_pylist()), batch)
        for i, record in enumerate(table.to_pylist()):
            assert same_bits(fp.transform_records([record]), batch[i : i + 1])


def test_the_pipeline_stage_is_the_same_transform_parsed_once(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
    from runtime.preprocessing import _stage

    table = pq.read_table(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=300, seed=5)))
    fitted = prep.fit(prep.FeatureSpec.model_validate(synthetic_feature_spec()), table)
    state = fitted.to_json()
    out = prep.transform_batch(table, state=state)
    assert out["x"].dtype == np.float32 and np.array_equal(out["x"], fitted.transform(table))
    assert np.array_equal(out["y"], fitted.transform_label(table))
    assert _stage.cached_preprocessor(state) is _stage.cached_preprocessor(state)  # one parse per process
    column = table.schema.get_field_index("tenure_months")
    bad = table.set_column(column, "tenure_months", pa.nulls(300, pa.float64()))
    with pytest.raises(SchemaValidationError, match="tenure_months") as info:
        prep.transform_batch(bad, state=state)
    # raised in a Ray Data task, it crosses processes by pickle with its fields intact
    import pickle

    again = pickle.loads(pickle.dumps(info.value))
    assert again.to_dict() == info.value.to_dict() and str(again) == str(info.value)


FINGERPRINTED = '''"""Module doc."""
import numpy as np  # numbers


def scale(x, k=2):
    """Scale x."""
    label = f"{k!r:>4} of {f'{x}'}"
    return np.asarray(x) * k, label
'''
# The normalized tokens' sha256 of FINGERPRINTED: a model trained on one Python must load on
# another (CI runs 3.11, the GPU machine 3.12), so this may never change with the version.
FINGERPRINTED_SHA256 = "1efdbba1b562406a11f85ae4f7b17f813b46d69567c1b8a84f626b8c5b56b411"


def test_the_code_fingerprint_is_the_same_on_every_python_version() -> None:
    import hashlib

    from runtime.preprocessing._fingerprint import normalized_tokens

    assert hashlib.sha256(normalized_tokens(FINGERPRINTED).encode()).hexdigest() == FINGERPRINTED_SHA256
    # and on the other interpreters this machine has (pyenv's), the same module gives the same digest
    module = Path(prep.__file__).parent / "_fingerprint.py"
    probe = (
        "import hashlib, importlib.util, sys; spec = importlib.util.spec_from_file_location('fp', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(hashlib.sha256(m.normalized_tokens(sys.argv[2]).encode()).hexdigest())"
    )
    others = sorted(Path.home().glob(".pyenv/versions/3.1[0-9]*/bin/python3"))
    for python in others:
        out = subprocess.run([str(python), "-c", probe, str(module), FINGERPRINTED], capture_output=True, text=True)
        assert out.stdout.strip() == FINGERPRINTED_SHA256, (python, out.stderr[-500:])
    # a docstring removed or reworded, a comment added: the same code
    edited = FINGERPRINTED.replace('    """Scale x."""\n', "").replace("# numbers", "# arrays")
    assert hashlib.sha256(normalized_tokens(edited).encode()).hexdigest() == FINGERPRINTED_SHA256
