"""A small churn model packaged with its monitoring reference, for tests without a Ray Train run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec


def packaged_with_reference(root: Path, rows: int = 8000, steps: int = 60) -> Path:
    """Fit an MLP for ``steps`` full-batch Adam steps on synthetic churn rows (three quarters of
    them; the rest is the holdout), package it and add its reference as training does."""
    import torch

    from runtime.models import MLPConfig, build_model
    from runtime.monitoring import REFERENCE_FILE, build_reference
    from runtime.preprocessing import FeatureSpec, fit
    from runtime.registry import add_model_file, load_model_dir, model_json, write_model_dir
    from runtime.tasks import task_for

    root.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(generate_synthetic(root / "train.parquet", SyntheticConfig(rows=rows, seed=1)))
    cut = rows * 3 // 4
    train, holdout = table.slice(0, cut), table.slice(cut)
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec("binary")), train)
    config = model_json(MLPConfig(hidden=[16]), prep, task_for("binary"))
    torch.manual_seed(0)
    net = build_model(config)
    x = torch.from_numpy(prep.transform(train))
    y = torch.from_numpy(prep.transform_label(train).astype(np.float32))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y).backward()
        opt.step()
    model_dir = write_model_dir(root / "model", net.state_dict(), config, prep)
    loaded = load_model_dir(model_dir)
    predicted = np.asarray(loaded.predict_table(holdout).values)
    accuracy = float(np.mean(predicted == np.asarray(holdout["churned"].to_pylist())))
    reference = build_reference(loaded, train, holdout, {"holdout_accuracy": accuracy})
    add_model_file(model_dir, REFERENCE_FILE, reference.to_json())
    return model_dir
