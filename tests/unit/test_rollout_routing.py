"""Sticky A/B routing (a stable hash, not Python's hash()) and the rollout spec's rules."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from runtime.config import load_config
from runtime.errors import ConfigError
from runtime.serving import RolloutSpec, pick_arm, stable_unit

WEIGHTS = {"v1": 70.0, "v2": 30.0}


def test_ten_thousand_keys_stay_on_their_arm_and_split_as_weighted() -> None:
    keys = [f"user-{i}" for i in range(10_000)]
    first = [pick_arm(WEIGHTS, stable_unit(k, "churn-live:churn")) for k in keys]
    again = [pick_arm(WEIGHTS, stable_unit(k, "churn-live:churn")) for k in keys]
    assert first == again
    share = Counter(first)["v2"] / len(keys)
    assert abs(share - 0.30) < 0.015, share  # 3 standard errors at n = 10,000


def test_the_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    """What a second router replica, or one restarted, computes (PYTHONHASHSEED differs)."""
    keys = [f"k{i}" for i in range(200)]
    here = [round(stable_unit(k, "salt"), 12) for k in keys]
    code = f"from runtime.serving import stable_unit; print([round(stable_unit(k, 'salt'), 12) for k in {keys!r}])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert eval(out.stdout) == here


def test_a_different_salt_reshuffles_keys() -> None:
    keys = [f"user-{i}" for i in range(2000)]
    a = [pick_arm(WEIGHTS, stable_unit(k, "one")) for k in keys]
    b = [pick_arm(WEIGHTS, stable_unit(k, "two")) for k in keys]
    assert 0.3 < sum(x != y for x, y in zip(a, b, strict=True)) / len(keys) < 0.6


def test_weights_of_zero_never_route_and_no_weight_at_all_is_refused() -> None:
    assert {pick_arm({"v1": 100.0, "v2": 0.0}, u / 100) for u in range(100)} == {"v1"}
    with pytest.raises(ValueError, match="no arm"):
        pick_arm({"v1": 0.0}, 0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": [50, 25, 100]}, "must increase"),
        ({"steps": [5, 50]}, "the last must be 100"),
        ({"steps": [100]}, "start below 100"),
        ({"app_args": {"model_uri": "models:/x/1"}}, "set by the rollout"),
        ({"stepz": [5, 100]}, "stepz"),
        ({"analysis": {"thresholds": {"max_p99_ration": 2}}}, "max_p99_ratio"),
    ],
)
def test_a_bad_spec_names_the_field_and_the_fix(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(RolloutSpec, {"app": "a", "model": "m", **change}, name="rollout.yaml")


def test_the_shipped_rollout_spec_is_valid() -> None:
    from pathlib import Path

    spec = load_config(RolloutSpec, Path(__file__).parents[2] / "serve_apps/rollouts/churn.yaml")
    assert spec.strategy == "canary" and spec.steps[-1] == 100 and spec.promotes
