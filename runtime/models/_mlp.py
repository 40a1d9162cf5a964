"""The multilayer perceptron over the preprocessed feature matrix (the tabular job's model)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from runtime.models._base import Architecture, ModelIO

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


class MLPConfig(Architecture):
    """``model: {architecture: mlp, hidden: [64, 32], dropout: 0.1, activation: relu}``."""

    architecture: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default=[64, 32], description="Hidden layer widths of the MLP.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")
    activation: Literal["relu", "gelu", "tanh"] = Field(default="relu")

    def build(self, io: ModelIO) -> nn.Module:
        return MLP(io.input_dim, io.output_dim, list(self.hidden), self.dropout, self.activation)
