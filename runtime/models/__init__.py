"""The model architectures skewless trains and serves, rebuilt from a plain JSON config.

A model is described by a JSON-able dict (``architecture`` plus its hyperparameters) that
travels in the model artifact beside the safetensors weights, so loading never unpickles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from runtime.models._transformer import CharTransformerLM, flops_per_token, num_parameters

__all__ = [
    "MLP",
    "CharTransformerLM",
    "build_model",
    "flops_per_token",
    "mlp_config",
    "num_parameters",
    "output_dim_for",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """A plain multilayer perceptron over the preprocessed float32 feature matrix."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden: list[int],
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, output_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def output_dim_for(task: str, num_classes: int | None) -> int:
    """Binary and regression heads have one output; multiclass one logit per class."""
    if task == "multiclass":
        if not num_classes or num_classes < 2:
            raise ValueError(f"multiclass needs >= 2 classes, got {num_classes}")
        return num_classes
    return 1


def mlp_config(
    prep: Any,
    task: str,
    hidden: Sequence[int],
    dropout: float = 0.0,
    activation: str = "relu",
    target_scale: Sequence[float] = (0.0, 1.0),
) -> dict[str, Any]:
    """The artifact config of an MLP over a fitted preprocessor's features (what
    :func:`build_model` and the packaged model read back)."""
    return {
        "architecture": "mlp",
        "input_dim": prep.output_dim,
        "output_dim": output_dim_for(task, len(prep.classes) if prep.classes else None),
        "hidden": list(hidden),
        "dropout": dropout,
        "activation": activation,
        "task": task,
        "classes": prep.classes,
        "target_scale": list(target_scale),
        "feature_names": prep.feature_names,
    }


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its artifact config (``architecture`` + hyperparameters)."""
    arch = config.get("architecture")
    if arch == "mlp":
        return MLP(
            input_dim=int(config["input_dim"]),
            output_dim=int(config["output_dim"]),
            hidden=[int(h) for h in config["hidden"]],
            dropout=float(config.get("dropout", 0.0)),
            activation=str(config.get("activation", "relu")),
        )
    if arch == "char_lm":
        return CharTransformerLM(
            vocab_size=int(config.get("vocab_size", 256)),
            d_model=int(config["d_model"]),
            n_heads=int(config["n_heads"]),
            n_layers=int(config["n_layers"]),
            seq_len=int(config["seq_len"]),
            dropout=float(config.get("dropout", 0.0)),
        )
    raise ValueError(f"unknown model architecture {arch!r}; known: ['char_lm', 'mlp']")
