"""The architecture seam: one :class:`Architecture` subclass per model type.

A subclass is the ``model:`` section a user writes (pydantic: hyperparameters with their
rules and defaults, discriminated by ``architecture``) and knows how to build the
``torch.nn.Module`` for given input and output widths. The packaged model's ``model.json``
is :meth:`Architecture.artifact_config`; :func:`runtime.models.build_model` rebuilds the module
from it, so loading never unpickles.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from runtime.config import StrictModel

if TYPE_CHECKING:
    from torch import nn

# Keys of model.json that are not hyperparameters: the widths and what the head means.
IO_KEYS = ("input_dim", "output_dim", "task", "classes", "target_scale", "feature_names")


@dataclass(frozen=True)
class ModelIO:
    """What a model is built for: input width (features, or the vocabulary) and output width."""

    input_dim: int
    output_dim: int


class Architecture(StrictModel):
    """Base of every architecture's config. Subclasses narrow ``architecture`` to a Literal,
    add their hyperparameters, set :attr:`inputs` and implement :meth:`build`."""

    architecture: str
    # "features": a float32 feature matrix from the shared preprocessing (the tabular job);
    # "tokens": int64 token ids (the language-model job).
    inputs: ClassVar[Literal["features", "tokens"]] = "features"

    def build(self, io: ModelIO) -> nn.Module:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def artifact_config(self, io: ModelIO, **head: Any) -> dict[str, Any]:
        """The ``model.json`` of a packaged model: hyperparameters, widths and the head's meaning."""
        return {**self.hyperparameters(), "input_dim": io.input_dim, "output_dim": io.output_dim, **head}

    @classmethod
    def source_files(cls) -> list[Path]:
        """The files whose code runs in this architecture's forward pass (for the code fingerprint):
        this base module and the module that defines the architecture."""
        return [Path(__file__), Path(inspect.getfile(cls))]
