"""The worker loop's pieces without Ray: micro-batching, events, checkpoints."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.models import MLPConfig, build_model
from runtime.preprocessing import FeatureSpec, features_and_labels, fit
from runtime.registry import model_json
from runtime.tasks import Head, task_for
from runtime.training import (
    Callback,
    CallbackList,
    Event,
    LoopState,
    TabularObjective,
    guarded_step,
    load_checkpoint,
    micro_batch_agreement,
    save_checkpoint,
    save_rng_state,
    train_step,
)

CPU = torch.device("cpu")
BINARY = TabularObjective("binary", Head((0, 1)))


@pytest.fixture(scope="module")
def batch_and_prep(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = generate_synthetic(tmp_path_factory.mktemp("d") / "d.parquet", SyntheticConfig(rows=512, seed=2))
    table = pq.read_table(path)
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec()), table)
    return table, prep


def _model(prep) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return build_model({"architecture": "mlp", "input_dim": prep.output_dim, "output_dim": 1, "hidden": [16]})


def _save(path: Path, model, opt, sched, prep, **position: int) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint of ``model`` at ``position`` (epoch, step, step_in_epoch, micro_batch_size)."""
    save_checkpoint(
        path,
        model,
        opt,
        sched,
        run_fingerprint=prep.fingerprint,
        extra_files={"preprocessor.json": prep.to_json()},
        **position,
    )


@pytest.mark.parametrize("micro", [1, 7, 64, 256])
def test_micro_batching_gives_the_full_batch_gradient(batch_and_prep, micro: int) -> None:  # type: ignore[no-untyped-def]
    table, prep = batch_and_prep
    batch = table.slice(0, 256)
    results = []
    for m in (256, micro):
        model = _model(prep)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state = LoopState(
            rank=0, world_size=1, epochs=1, batch_size=256, micro_batch_size=m, model=model, optimizer=opt
        )
        loss = float(train_step(state, features_and_labels(prep, batch), BINARY, CPU))
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    (full_loss, full), (micro_loss, parts) = results
    assert micro_loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(full, parts, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float summation order only


def test_a_step_recomputed_after_an_oom_redraws_the_same_dropout_masks(batch_and_prep) -> None:  # type: ignore[no-untyped-def]
    """The OOM comes after the forward pass drew its dropout masks: the retry must draw the
    same ones again, so the step equals one that started at the smaller micro-batch."""
    table, prep = batch_and_prep
    batch = table.slice(0, 64)

    class HalveOnOom(Callback):
        def on_oom(self, state: LoopState, error: BaseException) -> bool:
            state.micro_batch_size //= 2
            return True

    def run(micro: int, oom_above: int | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(model_json(MLPConfig(hidden=[32], dropout=0.5), prep, task_for("binary")))
        if oom_above is not None:
            forward = model.forward

            def late_oom(x: torch.Tensor) -> torch.Tensor:
                out = forward(x)  # the masks are drawn
                if x.shape[0] > oom_above:
                    raise torch.cuda.OutOfMemoryError("injected after the forward pass")
                return out

            model.forward = late_oom  # type: ignore[method-assign]
        state = LoopState(
            rank=0, world_size=1, epochs=1, batch_size=64, micro_batch_size=micro, model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        )  # fmt: skip
        torch.manual_seed(7)  # the loop's own stream
        guarded_step(state, features_and_labels(prep, batch), BINARY, CPU, "fp32", CallbackList([HalveOnOom()]),
                     micro_batch_agreement(1))  # fmt: skip
        assert state.micro_batch_size == 16
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(16, None), run(64, oom_above=16), strict=True):
        assert torch.equal(a, b)


def test_the_cache_is_emptied_after_the_failed_attempt_is_gone(batch_and_prep, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The failed micro-batch's activations live in the traceback's frames while the OOM is
    handled. Emptying the allocator's cache then releases nothing of them: they come back to
    the cache afterwards, fragmented, and the retry at a size that fits runs out again
    (1024 -> 512 -> 256 -> 128 on an H200 where 256 fits). The loop releases memory once
    they are dead, before each retry."""
    import weakref

    from runtime.training import _step

    table, prep = batch_and_prep
    batch = table.slice(0, 64)
    held: list[weakref.ref[torch.Tensor]] = []
    alive_in_on_oom: list[bool] = []
    alive_at_release: list[bool] = []
    release = _step.release_memory

    def checked_release(state: LoopState) -> None:
        alive_at_release.append(held[-1]() is not None)
        release(state)

    monkeypatch.setattr(_step, "release_memory", checked_release)

    class HalveOnOom(Callback):
        def on_oom(self, state: LoopState, error: BaseException) -> bool:
            alive_in_on_oom.append(held[-1]() is not None)  # the bundle sees the failed attempt
            state.micro_batch_size //= 2
            return True

    torch.manual_seed(0)
    model = _model(prep)
    forward = model.forward

    def big_then_oom(x: torch.Tensor) -> torch.Tensor:
        activation = torch.ones(1 << 20)  # what a real forward holds: 4 MiB
        held.append(weakref.ref(activation))
        if x.shape[0] > 16:
            raise torch.cuda.OutOfMemoryError("injected with an activation held in this frame")
        return forward(x)

    model.forward = big_then_oom  # type: ignore[method-assign]
    state = LoopState(
        rank=0, world_size=1, epochs=1, batch_size=64, micro_batch_size=64, model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )  # fmt: skip
    guarded_step(state, features_and_labels(prep, batch), BINARY, CPU, "fp32", CallbackList([HalveOnOom()]),
                 micro_batch_agreement(1))  # fmt: skip
    assert state.micro_batch_size == 16
    assert alive_in_on_oom == [True, True]  # 64 and 32 failed; the bundle was written with them alive
    assert alive_at_release == [False, False]  # memory released once per retry, after they were gone


def test_callbacks_fire_in_order_and_oom_is_claimed() -> None:
    seen: list[str] = []

    class Recorder(Callback):
        def on_step_end(self, state: LoopState) -> None:
            seen.append(f"step{state.step}")

        def on_oom(self, state: LoopState, error: BaseException) -> bool:
            state.micro_batch_size //= 2
            return True

    cbs = CallbackList([Recorder(), Callback()])
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=8, micro_batch_size=8, step=3)
    cbs.fire(Event.STEP_END, state)
    assert seen == ["step3"]
    assert cbs.on_oom(state, RuntimeError("x")) and state.micro_batch_size == 4
    assert not CallbackList([Callback()]).on_oom(state, RuntimeError("x"))
    assert {e.value for e in Event} == {n for n in dir(Callback) if n.startswith("on_")}


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(batch_and_prep, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table, prep = batch_and_prep
    model = _model(prep)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=64, micro_batch_size=64, model=model, optimizer=opt)
    train_step(state, features_and_labels(prep, table.slice(0, 64)), BINARY, CPU)
    sched.step()
    torch.manual_seed(123), np.random.seed(5), random.seed(9)
    _save(tmp_path, model, opt, sched, prep, epoch=1, step=7, step_in_epoch=3, micro_batch_size=16)
    expected = (torch.rand(3), np.random.rand(3), random.random())

    other = _model(prep)
    torch.nn.init.zeros_(next(other.parameters()))
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    resume = load_checkpoint(tmp_path, other, opt2, sched2)
    assert (resume.epoch, resume.step, resume.step_in_epoch, resume.micro_batch_size) == (1, 7, 3, 16)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert sched2.last_epoch == 1
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert (tmp_path / "preprocessor.json").read_text() == prep.to_json()


def test_each_rank_gets_its_own_rng_state_back(batch_and_prep, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, prep = batch_and_prep
    model = _model(prep)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(10)
    _save(tmp_path, model, opt, None, prep, rank=0, epoch=0, step=1, step_in_epoch=1, micro_batch_size=8)
    rank0 = torch.rand(4)
    torch.manual_seed(11)
    save_rng_state(tmp_path, rank=1)  # what rank 1 adds to the same (merged) directory
    rank1 = torch.rand(4)
    assert not torch.equal(rank0, rank1)
    for rank, expected in ((1, rank1), (0, rank0)):
        load_checkpoint(tmp_path, _model(prep), opt, None, rank=rank)
        assert torch.equal(torch.rand(4), expected), rank
    # rank 2 of a grown run: no state of its own; it keeps the stream it was seeded with
    grown = _model(prep)  # (seeds torch itself)
    torch.manual_seed(12)
    fresh = torch.rand(4)
    torch.manual_seed(12)
    load_checkpoint(tmp_path, grown, opt, None, rank=2)
    assert torch.equal(torch.rand(4), fresh)


def test_resume_refuses_a_checkpoint_of_other_preprocessing(batch_and_prep, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from runtime.errors import TrainingError

    _, prep = batch_and_prep
    model = _model(prep)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _save(tmp_path, model, opt, None, prep, epoch=1, step=3, step_in_epoch=0, micro_batch_size=8)
    with pytest.raises(TrainingError, match="use a new training.run_name"):
        load_checkpoint(tmp_path, _model(prep), opt, None, expected_fingerprint="f" * 64)
    assert load_checkpoint(tmp_path, _model(prep), opt, None, expected_fingerprint=prep.fingerprint).step == 3


def test_every_callbacks_run_end_runs_and_the_loops_error_wins() -> None:
    ended: list[str] = []

    class Ends(Callback):
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        def on_run_end(self, state: LoopState) -> None:
            ended.append(self.name)
            if self.fail:
                raise RuntimeError(f"{self.name} failed")

    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=8, micro_batch_size=8)
    cbs = CallbackList([Ends("a", fail=True), Ends("b"), Ends("c", fail=True)])
    with pytest.raises(RuntimeError, match="a failed"):
        cbs.on_run_end(state)  # the run succeeded: the first callback error is raised, after all ran
    assert ended == ["a", "b", "c"]
    ended.clear()
    state.error = ValueError("the loop failed")
    cbs.on_run_end(state)  # the loop's own error is the one that propagates; every callback still ran
    assert ended == ["a", "b", "c"]


def test_early_stopping_stops_and_restores_the_best_epoch(tmp_path: Path) -> None:
    from runtime.training.callbacks import EarlyStopping

    model = torch.nn.Linear(2, 1)
    state = LoopState(rank=0, world_size=1, epochs=10, batch_size=8, micro_batch_size=8, model=model)
    stop = EarlyStopping("valid_loss", higher_is_better=False, patience=2, min_delta=0.01)
    losses = [1.0, 0.5, 0.495, 0.6, 0.4]  # epoch 2 improves by less than min_delta
    best_weights = None
    for epoch, loss in enumerate(losses):
        state.epoch = epoch
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        if epoch == 1:
            best_weights = model.weight.detach().clone()
        state.metrics = {"valid_loss": loss}
        stop.on_epoch_end(state)
        if state.stop_requested:
            break
    assert state.epoch == 3 and state.stop_requested  # epochs 2 and 3 did not improve
    assert torch.equal(model.weight, best_weights)  # the model holds epoch 1's weights again
    assert state.metrics["early_stopping/best_epoch"] == 1.0
    assert state.metrics["early_stopping/stopped_epoch"] == 3.0
    # the decision survives a restart: the state and the best weights are in the checkpoint
    stop.on_checkpoint(state, tmp_path)
    again = EarlyStopping("valid_loss", higher_is_better=False, patience=2, min_delta=0.01)
    again.on_resume(state, tmp_path)
    assert (again.best, again.best_epoch, again.bad_epochs) == (0.5, 1, 2)
    with pytest.raises(Exception, match="not a validation metric of this run"):
        EarlyStopping("valid_rmse", False, 2).on_epoch_end(state)


def test_in_memory_source_is_independent_of_the_block_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """What each rank sees, and in which order, depends on the rows and the seed, not on how
    the rows were cut into blocks or in which order the blocks came."""
    from runtime.data import ORDER_KEY
    from runtime.training._ingest import InMemoryData
    from runtime.training._sources import InMemorySource

    rng = np.random.default_rng(0)
    n = 1000
    rows = {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.integers(0, 2, n), ORDER_KEY: rng.random(n)}

    def blocks(cuts: list[int], order: list[int]) -> list[dict[str, np.ndarray]]:
        edges = [0, *cuts, n]
        parts = [{k: v[a:b] for k, v in rows.items()} for a, b in itertools.pairwise(edges)]
        return [parts[i] for i in order]

    import ray

    monkeypatch.setattr(ray, "get", lambda refs: refs)  # the blocks as plain values, not refs

    def seen(parts: list[dict[str, np.ndarray]], rank: int) -> list[np.ndarray]:
        source = InMemorySource(InMemoryData(tuple(parts), tuple(parts[:1])), rank, 2, 64, seed=3)
        return [b["x"] for e in range(2) for b in source.batches(e)]

    for rank in (0, 1):
        a = seen(blocks([500], [0, 1]), rank)
        b = seen(blocks([100, 350, 900], [3, 1, 0, 2]), rank)
        assert len(a) == len(b) == 2 * 8  # 500 rows per rank, batches of 64, two epochs
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    first, second = seen(blocks([500], [0, 1]), 0), seen(blocks([500], [0, 1]), 1)
    assert not np.array_equal(first[0], second[0])  # the ranks see different rows
    assert not np.array_equal(first[0], first[8])  # and a new order every epoch


def test_in_memory_source_resumes_mid_epoch_and_splits_unevenly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed epoch skips exactly the steps already taken; every rank gets the same number of
    training rows (the remainder is dropped, as Ray's equal split does); validation rows are
    shared out unevenly, none lost, and a rank may have none."""
    import ray

    from runtime.data import ORDER_KEY
    from runtime.training._ingest import InMemoryData
    from runtime.training._sources import InMemorySource

    monkeypatch.setattr(ray, "get", lambda refs: refs)
    rng = np.random.default_rng(1)

    def block(n: int) -> dict[str, np.ndarray]:
        return {"x": rng.normal(size=(n, 2)).astype(np.float32), "y": rng.integers(0, 2, n), ORDER_KEY: rng.random(n)}

    train, valid = (block(103),), (block(2),)
    sources = [InMemorySource(InMemoryData(train, valid), rank, 3, 10, seed=0) for rank in range(3)]
    assert [s.rows for s in sources] == [34, 34, 34] and sources[0].steps_per_epoch() == 4
    full = [b["x"] for b in sources[1].batches(epoch=2)]
    assert [len(x) for x in full] == [10, 10, 10, 4]
    resumed = [b["x"] for b in sources[1].batches(epoch=2, skip=3)]
    assert len(resumed) == 1 and np.array_equal(resumed[0], full[3])
    seen = [sum(len(b["y"]) for b in s.eval_batches()) for s in sources]
    assert seen == [1, 1, 0]  # 2 validation rows over 3 ranks: none lost, one rank without


def test_an_empty_validation_is_nan_not_perfect() -> None:
    objective = TabularObjective("regression", Head(None, (0.0, 1.0)))
    metrics = objective.eval_metrics(dict.fromkeys(objective.eval_keys(), 0.0))
    assert all(np.isnan(v) for v in metrics.values()) and "valid_rmse" in metrics
    assert objective.metric_names() == ["valid_loss", "valid_rmse", "valid_mae", "valid_r2"]
    assert "valid_auc" not in BINARY.metric_names()  # AUC needs every row at once: holdout only
