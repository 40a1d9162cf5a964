"""The OOM guard against a real CUDA out-of-memory (not injected): a very wide MLP under an
allocator cap that fits a 256-row micro-batch but not 512. The guard halves twice and stops
at 256 (what the failed attempts held is freed before each retry), writes a bundle per
halving, and the step's result matches a run started at 256."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _setup(tmp_path: Path, micro: int) -> tuple[object, ...]:
    from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
    from runtime.models import MLPConfig, build_model
    from runtime.preprocessing import FeatureSpec, fit
    from runtime.registry import model_json
    from runtime.tasks import task_for
    from runtime.training import LoopState

    table = pq.read_table(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=1024, seed=1)))
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec()), table)
    torch.manual_seed(0)
    # activations dominate (~1 MiB a row): memory grows with the micro-batch, not the weights
    # dropout: a recomputed micro-batch must redraw the same masks (CUDA RNG restored)
    model = build_model(model_json(MLPConfig(hidden=[65536], dropout=0.2), prep, task_for("binary"))).cuda()
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=1024, micro_batch_size=micro)
    state.model, state.optimizer = model, torch.optim.SGD(model.parameters(), lr=1e-3)
    return table, prep, state


def test_real_oom_is_survived_with_the_same_result(tmp_path: Path) -> None:
    from runtime.preprocessing import features_and_labels
    from runtime.tasks import Head
    from runtime.training import CallbackList, TabularObjective, guarded_step, micro_batch_agreement
    from runtime.training.callbacks import OomGuard

    objective = TabularObjective("binary", Head((0, 1)))

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # the peak of this step, not of the tests before it
    table, prep, reference = _setup(tmp_path, 256)
    guarded_step(reference, features_and_labels(prep, table), objective, device, "fp32", CallbackList([]),
                 micro_batch_agreement(1))  # fmt: skip
    want = [p.detach().clone() for p in reference.model.parameters()]
    peak_256 = torch.cuda.max_memory_allocated()
    del reference
    torch.cuda.empty_cache()

    table, prep, state = _setup(tmp_path, 1024)
    total = torch.cuda.get_device_properties(0).total_memory
    cap = peak_256 * 1.3  # room for 256-row activations, not 512
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        guard = OomGuard(str(tmp_path / "diagnostics"))
        callbacks = CallbackList([guard])
        callbacks.on_run_start(state)
        guarded_step(state, features_and_labels(prep, table), objective, device, "fp32", callbacks,
                     micro_batch_agreement(1))  # fmt: skip
        callbacks.on_run_end(state)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert state.micro_batch_size == 256  # the largest that fits: not 128
    assert len(guard.bundles) == 2  # one per halving: 1024 -> 512 -> 256
    first, second = (Path(b) for b in guard.bundles)
    assert (first / "memory_snapshot.pickle").stat().st_size > 0
    report = (first / "REPORT.md").read_text()
    assert "CUDA out of memory" in report
    # the default arms allocator history at the first OOM: the first bundle lists consumers by
    # role, the second by the source line that allocated them
    assert "no allocator history" in report, report
    second_report = (second / "REPORT.md").read_text()
    assert "runtime/" in second_report.split("## The three largest consumers")[1].split("## Host")[0], second_report
    for got, ref in zip(state.model.parameters(), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # same micro-batches; GPU kernels may differ
