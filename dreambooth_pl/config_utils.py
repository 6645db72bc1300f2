"""Small helpers for reading the Hydra config."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig


def resolve_path(spec: str | DictConfig | dict) -> str:
    """A path option is a plain string, or a `_target_` node that makes the folder and returns it
    (the tiny model, the rendered demo subject)."""
    if isinstance(spec, (DictConfig, dict)):
        return str(instantiate(spec))
    return str(spec)
