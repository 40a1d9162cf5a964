"""Drift statistics, profiles and window summaries, and data problems (runtime.monitoring).

Pure: NumPy generators with fixed seeds, pyarrow tables, SciPy as the oracle. No Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats
from scipy.spatial import distance

import runtime.monitoring as monitoring
from runtime.errors import ConfigError, DataError
from runtime.monitoring import (
    STATISTICS,
    DriftConfig,
    ReferenceProfile,
    WindowSummary,
    _statistics,
    data_problems,
    drift_report,
)

NUMERIC = ["x0", "x1", "x2", "income", "age"]
CATEGORICAL = ["city", "device", "plan"]
CITIES = np.array([f"city_{i:03d}" for i in range(150)])  # more than the 100-value vocabulary
CITY_P = np.arange(150, 0, -1) / np.arange(150, 0, -1).sum()
DEVICES = np.array(["ios", "android", "web"])
PLANS = np.array(["free", "basic", "pro", "team"])


def _frame(
    rng: np.random.Generator, n: int, *, shift: float = 0.0, device_p: tuple[float, ...] = (0.5, 0.3, 0.2)
) -> pa.Table:
    """``shift`` moves x0 by that many of its standard deviations (2.0)."""
    return pa.table(
        {
            "x0": rng.normal(10.0 + 2.0 * shift, 2.0, n),
            "x1": rng.normal(0.0, 1.0, n),
            "x2": rng.uniform(-5.0, 5.0, n),
            "income": rng.lognormal(10.0, 0.5, n),
            "age": rng.integers(18, 90, n).astype(np.float64),
            "city": pa.DictionaryArray.from_arrays(rng.choice(150, n, p=CITY_P).astype(np.int32), CITIES),
            "device": pa.DictionaryArray.from_arrays(rng.choice(3, n, p=device_p).astype(np.int32), DEVICES),
            "plan": pa.DictionaryArray.from_arrays(rng.choice(4, n, p=[0.4, 0.3, 0.2, 0.1]).astype(np.int32), PLANS),
        }
    )


@pytest.fixture(scope="module")
def reference() -> pa.Table:
    return _frame(np.random.default_rng(1), 100_000)


@pytest.fixture(scope="module")
def profile(reference: pa.Table) -> ReferenceProfile:
    return ReferenceProfile.from_table(reference, numeric=NUMERIC, categorical=CATEGORICAL)


def _window(profile: ReferenceProfile, table: pa.Table) -> WindowSummary:
    return WindowSummary.from_table(profile, table)


# -- the public surface ---------------------------------------------------------------


def test_public_names_are_sorted_and_present() -> None:
    ruff_order = sorted(monitoring.__all__, key=lambda n: (not n.isupper(), not n[0].isupper(), n))  # RUF022
    assert monitoring.__all__ == ruff_order
    assert all(hasattr(monitoring, name) for name in monitoring.__all__)
    assert {"ks", "wasserstein", "psi", "chi2", "jensen_shannon"} <= set(STATISTICS)


def test_config_names_unknown_or_misplaced_statistics() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'wasserstein'"):
        DriftConfig(numeric_large="wasserstien")
    with pytest.raises(ConfigError, match="not a numeric statistic"):
        DriftConfig(numeric_small="chi2")
    with pytest.raises(ConfigError, match="drift_share"):
        DriftConfig(drift_share=0.0)


# -- the statistics agree with SciPy --------------------------------------------------


def test_ks_and_wasserstein_on_raw_samples_are_scipys(profile: ReferenceProfile, reference: pa.Table) -> None:
    rng = np.random.default_rng(2)
    live = _frame(rng, 700, shift=0.2)
    ref_x, live_x = reference.column("x0").to_numpy(), live.column("x0").to_numpy()
    window = _window(profile, live)
    report = drift_report(profile, window, samples={"x0": (ref_x, live_x)}, config=DriftConfig(correction=False))
    assert report.features[0].value == pytest.approx(stats.ks_2samp(ref_x, live_x).pvalue, rel=1e-12)

    big_table = _frame(rng, 5_000, shift=0.2)
    big_x = big_table.column("x0").to_numpy()
    big = _window(profile, big_table)
    row = drift_report(profile, big, samples={"x0": (ref_x, big_x)}).features[0]
    assert row.statistic == "wasserstein"
    assert row.value == pytest.approx(stats.wasserstein_distance(ref_x, big_x) / np.std(ref_x), rel=1e-12)


def test_binned_ks_is_scipys_when_the_bins_hold_every_distinct_value() -> None:
    """On integer data the quantile edges land on the distinct values, so the binned ECDFs are
    the exact ones and the binned KS equals SciPy's asymptotic two-sample test."""
    rng = np.random.default_rng(4)
    ref = rng.integers(0, 8, 20_000).astype(np.float64)
    live = rng.binomial(7, 0.5, 600).astype(np.float64)  # same support, another shape
    profile = ReferenceProfile.from_table(pa.table({"k": ref}), numeric=["k"])
    row = drift_report(profile, _window(profile, pa.table({"k": live})), config=DriftConfig(correction=False)).features[
        0
    ]
    assert row.value == pytest.approx(stats.ks_2samp(ref, live, method="asymp").pvalue, rel=1e-9)


def test_binned_ks_and_wasserstein_approximate_scipy_on_continuous_data(
    profile: ReferenceProfile, reference: pa.Table
) -> None:
    ref_x = reference.column("x0").to_numpy()
    for shift in (0.0, 0.1, 0.5, 1.0):
        live = _frame(np.random.default_rng(5), 3_000, shift=shift)
        live_x = live.column("x0").to_numpy()
        window = _window(profile, live).numeric["x0"]
        reference_x = profile.numeric["x0"]
        comparison = monitoring.Comparison(
            reference=np.asarray(reference_x.counts),
            window=np.asarray(window.counts),
            edges=np.asarray(reference_x.edges),
            reference_std=reference_x.std,
            reference_tail_means=reference_x.tail_means,
            window_tail_means=window.tail_means,
        )
        exact_w = stats.wasserstein_distance(ref_x, live_x) / np.std(ref_x)
        assert STATISTICS["wasserstein"].compute(comparison) == pytest.approx(exact_w, abs=0.03)
        # the edges see a lower bound of D, so the binned p-value is the larger (errs to "no drift")
        exact_p = stats.ks_2samp(ref_x, live_x, method="asymp").pvalue
        binned_p = STATISTICS["ks"].compute(comparison)
        assert binned_p >= exact_p * (1 - 1e-9)
        assert (binned_p < 0.05) == (exact_p < 0.05)


def test_chi2_and_jensen_shannon_are_scipys_on_the_same_counts(profile: ReferenceProfile, reference: pa.Table) -> None:
    rng = np.random.default_rng(6)
    live = _frame(rng, 800, device_p=(0.4, 0.35, 0.25))
    ref_counts = np.bincount(reference.column("device").combine_chunks().indices.to_numpy(), minlength=3)
    live_counts = np.bincount(live.column("device").combine_chunks().indices.to_numpy(), minlength=3)
    # the vocabulary is ordered by frequency: ios, android, web, as DEVICES is
    assert profile.categorical["device"].vocabulary == tuple(DEVICES)

    chi2 = drift_report(profile, _window(profile, live), config=DriftConfig(correction=False))
    device = next(r for r in chi2.features if r.feature == "device")
    expected = ref_counts / ref_counts.sum() * live_counts.sum()
    assert device.statistic == "chi2"
    assert device.value == pytest.approx(stats.chisquare(live_counts, expected).pvalue, rel=1e-9)

    large = DriftConfig(small_window_rows=0)
    device = next(
        r for r in drift_report(profile, _window(profile, live), config=large).features if r.feature == "device"
    )
    assert device.statistic == "jensen_shannon"
    want = distance.jensenshannon(ref_counts / ref_counts.sum(), live_counts / live_counts.sum())  # natural log
    assert device.value == pytest.approx(want, rel=1e-9)


def test_psi_matches_its_definition() -> None:
    reference, window = np.array([500, 300, 200, 0]), np.array([100, 300, 500, 100])
    p, q = np.maximum(reference / 1000, 1e-4), np.maximum(window / 1000, 1e-4)
    want = float(np.sum((q - p) * np.log(q / p)))
    got = STATISTICS["psi"].compute(monitoring.Comparison(reference=reference, window=window))
    assert got == pytest.approx(want)


def test_benjamini_hochberg_fallback_matches_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    p = np.random.default_rng(7).uniform(0, 0.2, 37)
    want = stats.false_discovery_control(p, method="bh")
    assert np.allclose(monitoring.benjamini_hochberg(p), want)
    monkeypatch.delattr(_statistics.stats, "false_discovery_control")
    assert np.allclose(monitoring.benjamini_hochberg(p), want)


# -- drift is flagged, and same-distribution windows stay quiet -----------------------


@pytest.mark.parametrize(
    ("rows", "numeric_statistic", "categorical_statistic"),
    [(500, "ks", "chi2"), (100_000, "wasserstein", "jensen_shannon")],
)
def test_a_shifted_feature_and_a_changed_mix_are_flagged(
    profile: ReferenceProfile, rows: int, numeric_statistic: str, categorical_statistic: str
) -> None:
    live = _frame(np.random.default_rng(8), rows, shift=1.0, device_p=(0.2, 0.3, 0.5))
    report = drift_report(profile, _window(profile, live))
    rows_by_name = {r.feature: r for r in report.features}
    assert rows_by_name["x0"].statistic == numeric_statistic and rows_by_name["x0"].drifted
    assert rows_by_name["device"].statistic == categorical_statistic and rows_by_name["device"].drifted
    assert report.drifted_features == ["x0", "device"]
    assert report.n_drifted == 2 and report.n_tested == 8 and not report.dataset_drift
    assert not report.problems
    assert drift_report(profile, _window(profile, live), config=DriftConfig(drift_share=0.25)).dataset_drift


def test_same_distribution_windows_of_100k_rows_raise_at_most_one_false_alarm(profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(9)
    reports = [drift_report(profile, _window(profile, _frame(rng, 100_000))) for _ in range(20)]
    assert sum(r.dataset_drift for r in reports) <= 1
    assert sum(r.n_drifted for r in reports) <= 1  # of 160 feature verdicts
    assert max(r.value for rep in reports for r in rep.features) < 0.05  # far under the 0.1 thresholds


def test_small_same_distribution_windows_rarely_flag_after_correction(profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(10)
    reports = [drift_report(profile, _window(profile, _frame(rng, 500))) for _ in range(20)]
    assert all(r.features[0].statistic == "ks" for r in reports)
    assert sum(r.dataset_drift for r in reports) == 0
    assert sum(r.n_drifted for r in reports) <= 3  # of 160, at a 5% false discovery rate


def test_the_prediction_distribution_is_tested_but_not_counted_as_a_feature() -> None:
    rng = np.random.default_rng(11)
    table = pa.table({"x": rng.normal(size=5_000)})
    scores = ReferenceProfile.from_table(table, numeric=["x"], predictions=rng.beta(2, 5, 5_000))
    window = WindowSummary.from_table(scores, pa.table({"x": rng.normal(size=400)}), predictions=rng.beta(5, 2, 400))
    report = drift_report(scores, window)
    assert report.prediction is not None and report.prediction.kind == "numeric" and report.prediction.drifted
    assert report.n_tested == 1 and not report.dataset_drift

    labels = ReferenceProfile.from_table(
        table, numeric=["x"], predictions=np.where(rng.random(5_000) < 0.8, "no", "yes")
    )
    window = WindowSummary.from_table(
        labels, pa.table({"x": rng.normal(size=400)}), predictions=np.where(rng.random(400) < 0.4, "no", "yes")
    )
    report = drift_report(labels, window)
    assert report.prediction is not None and report.prediction.statistic == "chi2" and report.prediction.drifted


# -- data problems are not drift ------------------------------------------------------


def test_a_unit_change_is_a_data_problem_not_drift(profile: ReferenceProfile) -> None:
    for rows, factor in ((500, 1000.0), (100_000, 1000.0), (5_000, 0.001)):
        live = _frame(np.random.default_rng(12), rows)
        live = live.set_column(
            live.schema.get_field_index("income"), "income", pa.array(live.column("income").to_numpy() * factor)
        )
        report = drift_report(profile, _window(profile, live))
        [problem] = report.problems
        assert problem.feature == "income" and problem.problem == "unit_change"
        assert f"near ×{factor:g}" in problem.seen and "unit" in problem.why
        income = next(r for r in report.features if r.feature == "income")
        assert income.data_problem and not income.drifted and income.verdict == "data problem"
        assert report.n_tested == 7 and report.n_drifted == 0 and not report.dataset_drift


def test_a_renamed_category_is_a_data_problem(profile: ReferenceProfile) -> None:
    live = _frame(np.random.default_rng(13), 2_000)
    renamed = pa.compute.cast(live.column("device"), pa.string()).to_numpy(zero_copy_only=False)
    renamed = np.char.upper(renamed.astype(str))  # "ios" -> "IOS", ...
    live = live.set_column(live.schema.get_field_index("device"), "device", pa.array(renamed))
    [problem] = data_problems(profile, _window(profile, live))
    assert problem.feature == "device" and problem.problem == "renamed_category"
    assert "'ios'" in problem.seen and "'IOS'" in problem.seen and "rename" in problem.why

    one = _frame(np.random.default_rng(14), 2_000)  # one label renamed, the others intact
    devices = pa.compute.cast(one.column("device"), pa.string()).to_numpy(zero_copy_only=False).astype(object)
    devices[devices == "web"] = "browser"
    one = one.set_column(one.schema.get_field_index("device"), "device", pa.array(devices.tolist()))
    report = drift_report(profile, _window(profile, one))
    assert [p.feature for p in report.problems] == ["device"] and "'web'" in report.problems[0].seen
    assert not next(r for r in report.features if r.feature == "device").drifted


def test_a_column_gone_all_null_or_absent_is_a_data_problem(profile: ReferenceProfile) -> None:
    live = _frame(np.random.default_rng(15), 600)
    live = live.set_column(live.schema.get_field_index("x1"), "x1", pa.nulls(600, pa.float64()))
    live = live.drop_columns(["plan"])
    report = drift_report(profile, _window(profile, live))
    assert {(p.feature, p.problem) for p in report.problems} == {("x1", "all_null"), ("plan", "all_null")}
    assert "all 600 values" in report.problems[0].seen
    assert report.n_tested == 6 and not report.dataset_drift
    assert "data problem: x1: all_null" in report.table()


def test_real_drift_and_new_categories_are_not_data_problems(profile: ReferenceProfile) -> None:
    live = _frame(np.random.default_rng(16), 5_000, shift=3.0, device_p=(0.1, 0.1, 0.8))
    assert data_problems(profile, _window(profile, live)) == []
    extra = _frame(np.random.default_rng(17), 5_000)
    plans = pa.compute.cast(extra.column("plan"), pa.string()).to_numpy(zero_copy_only=False).astype(object)
    plans[:500] = "enterprise"  # a new plan beside the old ones is a change in the world
    extra = extra.set_column(extra.schema.get_field_index("plan"), "plan", pa.array(plans.tolist()))
    assert data_problems(profile, _window(profile, extra)) == []


# -- summaries merge, and everything round-trips through JSON -------------------------


def test_two_window_summaries_merge_to_the_summary_of_the_concatenation(profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(18)
    a, b = _frame(rng, 3_000, shift=0.3), _frame(rng, 1_700)
    holes = pa.array(b.column("x2").to_numpy(), mask=rng.random(1_700) < 0.1)  # 10% nulls in one part
    b = b.set_column(b.schema.get_field_index("x2"), "x2", holes)
    merged = _window(profile, a).merge(_window(profile, b))
    whole = _window(profile, pa.concat_tables([a, b]))
    assert merged.n_rows == whole.n_rows == 4_700
    for name, got in merged.numeric.items():
        want = whole.numeric[name]
        assert (got.counts, got.count, got.missing, got.minimum, got.maximum) == (
            want.counts,
            want.count,
            want.missing,
            want.minimum,
            want.maximum,
        )
        for moment in ("mean", "m2", "abs_total"):
            assert math.isclose(getattr(got, moment), getattr(want, moment), rel_tol=1e-9), (name, moment)
        assert np.allclose(got.tail_sums, want.tail_sums, rtol=1e-9)
    for name, cat in merged.categorical.items():  # the out-of-vocabulary examples are a top-10, not exact
        whole_cat = whole.categorical[name]
        assert (cat.vocabulary, cat.counts, cat.oov, cat.missing) == (
            whole_cat.vocabulary,
            whole_cat.counts,
            whole_cat.oov,
            whole_cat.missing,
        )
    assert merged.categorical["device"] == whole.categorical["device"]
    assert merged.merge(WindowSummary.empty(profile)) == merged
    got_rows, want_rows = drift_report(profile, merged).features, drift_report(profile, whole).features
    assert [r.value for r in got_rows] == pytest.approx([r.value for r in want_rows], rel=1e-9)
    other = ReferenceProfile.from_table(a, numeric=["x0"])
    with pytest.raises(DataError, match="different profiles"):
        merged.merge(WindowSummary.from_table(other, a))
    with pytest.raises(DataError, match="not this one"):
        drift_report(other, merged)


def test_profile_summary_and_report_round_trip_through_json(profile: ReferenceProfile, reference: pa.Table) -> None:
    rng = np.random.default_rng(19)
    live = _frame(rng, 900)
    predicted = ReferenceProfile.from_table(live, numeric=NUMERIC, categorical=CATEGORICAL, predictions=rng.random(900))
    for p in (profile, predicted):
        assert ReferenceProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    window = WindowSummary.from_table(predicted, live, predictions=rng.random(900))
    assert WindowSummary.from_dict(json.loads(json.dumps(window.to_dict()))) == window
    report = drift_report(predicted, window)
    json.dumps(report.to_dict(), allow_nan=False)
    city_counts = pa.compute.value_counts(reference.column("city")).to_pylist()
    top = sorted(city_counts, key=lambda vc: (-vc["counts"], vc["values"]))[:100]
    assert profile.categorical["city"].vocabulary == tuple(vc["values"] for vc in top)
    assert 0 < profile.categorical["city"].oov_share < 0.2
    assert len(profile.numeric["x0"].edges) == 19 and profile.numeric["x0"].missing_rate == 0.0
    with pytest.raises(DataError, match="format version"):
        ReferenceProfile.from_dict({**profile.to_dict(), "version": 99})


def test_the_table_names_every_feature_and_the_verdict(profile: ReferenceProfile) -> None:
    live = _frame(np.random.default_rng(20), 100_000, shift=1.0, device_p=(0.2, 0.3, 0.5))
    text = drift_report(profile, _window(profile, live), config=DriftConfig(drift_share=0.25)).table()
    assert text.splitlines()[0].split()[:4] == ["feature", "kind", "statistic", "value"]
    assert all(name in text for name in NUMERIC + CATEGORICAL)
    assert "2 of 8 features drifted (25%; drift at >= 25%): DRIFT" in text
