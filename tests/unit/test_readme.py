"""The README's promises: two commands up front, and CI runs exactly them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_exactly_two_commands() -> None:
    first = code_blocks("bash")[0].strip().splitlines()
    assert len(first) == 2
    setup, tests = first
    assert setup.startswith("python3 -m venv .venv && ") and setup.endswith(" && .venv/bin/skewless demo")
    assert "-c constraints.txt" in setup  # the pinned versions are what gets installed
    assert tests.startswith(".venv/bin/python -m pytest")


def test_ci_runs_the_readme_commands() -> None:
    ci = (REPO / ".ci/run").read_text()
    assert "README.md" in ci and 'eval "$setup"' in ci and 'eval "$tests"' in ci
    for tool in ("ruff check", "ruff format --check", "mypy"):
        assert tool in ci


def test_constraints_pin_torch_without_local_tag() -> None:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines  # a CPU machine takes +cpu, a GPU machine the CUDA build
    assert not any(line.lower().startswith(("nvidia-cuda", "nvidia-cudnn")) for line in lines)


def test_the_extension_examples_are_one_class_and_one_registry_entry(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The development section's examples run against the real seams: registered in their
    registry, each works where the built-in ones do."""
    import asyncio
    import json

    import numpy as np
    import pyarrow as pa
    import torch

    from runtime import models, tasks
    from runtime.preprocessing import FeatureSpec
    from runtime.tasks import Head

    namespace: dict[str, object] = {}
    for block in code_blocks("python"):
        if "class " in block:
            exec(compile(block, "README.md", "exec", dont_inherit=True), namespace)

    # the architecture: built from a model.json like the packaged model's
    monkeypatch.setitem(models.ARCHITECTURES, "linear", namespace["LinearConfig"])
    linear = models.build_model({"architecture": "linear", "input_dim": 3, "output_dim": 1, "bias": False})
    assert isinstance(linear, torch.nn.Linear) and linear.bias is None

    # the task: a label spec names it, and its head, loss, predictions and metrics work
    poisson = namespace["PoissonTask"]()  # type: ignore[operator]
    monkeypatch.setitem(tasks.TASKS, "poisson", poisson)
    spec = FeatureSpec.model_validate(
        {"label": {"name": "n", "task": "poisson"}, "features": [{"name": "x", "type": "numeric"}]}
    )
    assert spec.label is not None and spec.label.task == "poisson"
    preds = poisson.predict(np.zeros((4, 1), np.float32), Head())
    assert preds.values == [1.0] * 4
    loss = poisson.loss()(torch.zeros(4, 1), poisson.targets(np.ones(4), Head()))
    assert torch.isfinite(loss)
    acc = poisson.accumulator()
    acc.add(preds, np.ones(4))
    assert acc.result()["rmse"] == 0.0

    # the route: needs the key by default, answers from the replica's preprocessing
    route = namespace["SchemaRoute"]()  # type: ignore[operator]
    assert route.auth and route.methods == {"GET"} and route.path == "/schema"

    class Replica:
        class preprocessor:
            input_schema = pa.schema([("x", pa.float64())])

    response = asyncio.run(route.handle(Replica(), None))
    assert json.loads(response.body) == {"columns": {"x": "double"}}
