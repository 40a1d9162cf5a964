"""Fractional-GPU budgets and the packing check; the CUDA side runs in tests/gpu."""

from __future__ import annotations

import logging

import pytest

from runtime.errors import ConfigError
from runtime.memory import (
    DEFAULT_CONTEXT_HEADROOM,
    GpuBudget,
    ReplicaBudget,
    ReplicaDemand,
    apply_budget,
    budget_usage,
    check_packing,
)

MIB, GIB = 2**20, 2**30
H100 = 80 * GIB
CONTEXT = int(0.6 * GIB)  # round in GiB, so the messages below read exactly


def test_budget_bytes_leave_room_for_the_cuda_context() -> None:
    assert DEFAULT_CONTEXT_HEADROOM == 600 * MIB
    assert GpuBudget(0.25).budget_bytes(H100) == 20 * GIB - 600 * MIB
    assert GpuBudget(1.0, headroom_bytes=0).budget_bytes(H100) == H100


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan")])
def test_fraction_must_be_a_share_of_one_gpu(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"fraction \(.*\) must be in \(0, 1\]: the share of one GPU"):
        GpuBudget(fraction)


def test_a_share_smaller_than_the_context_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        GpuBudget(0.005).budget_bytes(H100)
    assert str(info.value) == (
        "fraction 0.005 of a 80.0 GiB GPU is 0.4 GiB, which does not hold the 0.6 GiB CUDA context; raise num_gpus"
    )


def test_budget_bytes_needs_a_total() -> None:
    with pytest.raises(ValueError, match="needs the device's total memory"):
        GpuBudget(0.5).budget_bytes()


def test_apply_budget_on_cpu_is_a_logged_no_op(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="runtime.memory._budget"):
        assert apply_budget(0.25) is None
    assert "no GPU: budget not applied" in caplog.text
    with pytest.raises(ConfigError, match=r"fraction \(1.5\)"):  # still checked without a GPU
        apply_budget(1.5)


def test_budget_usage_needs_an_applied_budget() -> None:
    with pytest.raises(ValueError, match="pass what apply_budget returned"):
        budget_usage(GpuBudget(0.25))


# ------------------------------------------------------------ packing


def test_a_plan_that_fits() -> None:
    plan = check_packing(
        [
            ReplicaDemand("predictor", 2, 0.25, declared_bytes=8 * GIB, measured_bytes=12 * GIB),
            ReplicaDemand("ranker", 1, 0.5),  # no figure: only the fraction is checked
            ReplicaDemand("embedder", 2, 1, measured_bytes=70 * GIB),
        ],
        device_total_bytes=H100,
        devices=3,
        headroom_bytes=CONTEXT,
    )
    assert plan.replicas == (
        ReplicaBudget("predictor", 2, 0.25, 20 * GIB - CONTEXT, 12 * GIB),
        ReplicaBudget("ranker", 1, 0.5, 40 * GIB - CONTEXT, None),
        ReplicaBudget("embedder", 2, 1, 80 * GIB - CONTEXT, 70 * GIB),
    )
    assert plan.device_load == (1.0, 1.0, 1.0)


def test_replicas_that_outgrow_their_share_are_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError) as info:
        check_packing(
            [ReplicaDemand("predictor", 4, 0.25, declared_bytes=16 * GIB, measured_bytes=21 * GIB)],
            device_total_bytes=H100,
            headroom_bytes=CONTEXT,
        )
    assert str(info.value) == (
        "deployment 'predictor': 4 replicas × 0.25 GPU need 4 × 21.0 GiB measured (+0.6 GiB context each) "
        "= 86.4 GiB > 80.0 GiB on 1 GPU; lower num_replicas, raise num_gpus per replica or shrink the model"
    )


def test_a_declared_need_counts_when_it_is_larger() -> None:
    with pytest.raises(ConfigError) as info:
        check_packing([ReplicaDemand("ranker", 1, 0.5, declared_bytes=40 * GIB, measured_bytes=30 * GIB)], H100)
    assert str(info.value) == (
        "deployment 'ranker': 1 replica × 0.5 GPU need 1 × 40.0 GiB declared (+0.6 GiB context each) "
        "= 40.6 GiB > 40.0 GiB on 0.5 GPU; lower num_replicas, raise num_gpus per replica or shrink the model"
    )


def test_fractions_over_the_gpus_are_refused_and_every_problem_is_listed() -> None:
    with pytest.raises(ConfigError) as info:
        check_packing(
            [
                ReplicaDemand("predictor", 4, 0.25, measured_bytes=21 * GIB),
                ReplicaDemand("ranker", 1, 0.25),
            ],
            device_total_bytes=H100,
            headroom_bytes=CONTEXT,
        )
    assert str(info.value).splitlines() == [
        "replicas need 1.25 GPU but 1 GPU is available: 'predictor' 4 × 0.25 + 'ranker' 1 × 0.25; "
        "lower num_replicas or num_gpus per replica, or add GPUs",
        "deployment 'predictor': 4 replicas × 0.25 GPU need 4 × 21.0 GiB measured (+0.6 GiB context each) "
        "= 86.4 GiB > 80.0 GiB on 1 GPU; lower num_replicas, raise num_gpus per replica or shrink the model",
    ]


def test_fractions_that_fit_in_sum_but_not_per_gpu_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        check_packing([ReplicaDemand("big", 3, 0.6)], device_total_bytes=H100, devices=2)
    assert str(info.value) == (
        "replicas of 'big' 3 × 0.6 do not pack onto 2 GPUs: a replica of 'big' needs 0.6 of one GPU and the GPUs "
        "are already at 0.6, 0.6; Ray places a fractional replica on a single GPU. Use fractions that divide 1 "
        "(0.5, 0.25, ...) or add GPUs"
    )


def test_a_share_that_cannot_hold_the_context() -> None:
    with pytest.raises(ConfigError, match=r"'tiny': 0.005 GPU is 0.4 GiB, which does not hold the 0.6 GiB"):
        check_packing([ReplicaDemand("tiny", 1, 0.005)], H100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_replicas": 0}, r"deployment 'd': num_replicas \(0\) must be >= 1"),
        ({"num_gpus": 0}, r"deployment 'd': num_gpus \(0\) must be > 0"),
        ({"num_gpus": 1.5}, r"num_gpus \(1.5\) must be <= 1 or a whole number .*; use 2 or 1"),
        ({"measured_bytes": -1}, r"measured_bytes \(-1\) must be >= 0"),
    ],
)
def test_replica_demands_are_checked(kwargs: dict[str, float], message: str) -> None:
    args: dict[str, float] = {"num_replicas": 1, "num_gpus": 0.5} | kwargs
    with pytest.raises(ConfigError, match=message):
        ReplicaDemand("d", **args)  # type: ignore[arg-type]


def test_plan_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"devices \(0\) must be >= 1"):
        check_packing([], H100, devices=0)
    with pytest.raises(ConfigError, match=r"device_total_bytes \(0\) must be > 0"):
        check_packing([], 0)
