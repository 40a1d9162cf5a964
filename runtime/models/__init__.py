"""The model architectures skewless trains and serves, in a registry keyed by ``architecture``.

An architecture is one :class:`Architecture` subclass (its hyperparameters and ``build``)
and one entry in :data:`ARCHITECTURES`; :data:`ModelConfig`, the ``model:`` section of a
job config, is the discriminated union of the registered classes (``architecture`` defaults
to ``mlp``). A packaged model's ``model.json`` is the architecture's
:meth:`~Architecture.artifact_config`; :func:`build_model` rebuilds the module from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Discriminator, Tag
from torch import nn

from runtime.config import validate
from runtime.errors import ConfigError
from runtime.models._base import IO_KEYS, Architecture, ModelIO
from runtime.models._mlp import MLP, MLPConfig
from runtime.models._transformer import VOCAB_SIZE, CharLMConfig, CharTransformerLM, flops_per_token, num_parameters

__all__ = [
    "ARCHITECTURES",
    "MLP",
    "VOCAB_SIZE",
    "Architecture",
    "CharLMConfig",
    "CharTransformerLM",
    "MLPConfig",
    "ModelConfig",
    "ModelIO",
    "architecture_of",
    "build_model",
    "flops_per_token",
    "num_parameters",
]

DEFAULT_ARCHITECTURE = "mlp"
ARCHITECTURES: dict[str, type[Architecture]] = {
    "mlp": MLPConfig,
    "char_lm": CharLMConfig,
}


def _architecture_key(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("architecture", DEFAULT_ARCHITECTURE))
    return str(getattr(value, "architecture", DEFAULT_ARCHITECTURE))


if TYPE_CHECKING:
    ModelConfig = Architecture
else:
    ModelConfig = Annotated[
        Union[tuple(Annotated[cls, Tag(name)] for name, cls in ARCHITECTURES.items())],  # noqa: UP007
        Discriminator(_architecture_key),
    ]


def architecture_of(config: dict[str, Any]) -> Architecture:
    """The architecture (validated hyperparameters) of a packaged model's ``model.json``."""
    name = _architecture_key(config)
    cls = ARCHITECTURES.get(name)
    if cls is None:
        raise ConfigError(f"model architecture {name!r} is not one of {', '.join(map(repr, ARCHITECTURES))}")
    hyper = {k: v for k, v in config.items() if k not in IO_KEYS}
    return validate(cls, hyper, f"model architecture {name!r}")


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``model.json`` (architecture, hyperparameters, widths)."""
    arch = architecture_of(config)
    return arch.build(ModelIO(int(config["input_dim"]), int(config["output_dim"])))
