"""``skewless reproduce`` exits non-zero and names what differs when a reproduction is not exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import runtime.training
from runtime.cli import main
from runtime.training import Reproduction, TrainOutcome


def _reproduction(new_accuracy: float, weights_equal: bool, ingest: str = "memory") -> Reproduction:
    outcome = TrainOutcome(
        "run", "churn", "7", {"holdout_accuracy": new_accuracy, "holdout_auc": 0.8}, False, "", Path("."), pa.table({})
    )
    return Reproduction({"holdout_accuracy": 0.7455, "holdout_auc": 0.8}, outcome, weights_equal, ingest)


def test_an_exact_reproduction_exits_zero(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(runtime.training, "reproduce", lambda *a, **k: _reproduction(0.7455, True))
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "models:/churn/1"])
    assert info.value.code == 0
    assert "exact" in capsys.readouterr().out


def test_a_different_model_exits_one_naming_the_metrics(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    result = _reproduction(0.7316, False, ingest="stream")
    assert not result.exact and result.mismatches() == ["holdout_accuracy 0.7455 -> 0.7316", "the weights differ"]
    monkeypatch.setattr(runtime.training, "reproduce", lambda *a, **k: result)
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "models:/churn/1"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "not exact" in err and "holdout_accuracy 0.7455 -> 0.7316" in err and "the weights differ" in err
    assert "streamed its data" in err  # why, when the original run streamed
