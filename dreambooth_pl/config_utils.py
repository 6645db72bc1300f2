"""Small helpers for reading the Hydra config."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

T = TypeVar("T")


def resolve_path(spec: str | DictConfig | dict) -> str:
    """A path option is a plain string, or a `_target_` node that makes the folder and returns it
    (the tiny model, the rendered demo subject)."""
    if isinstance(spec, (DictConfig, dict)):
        return str(instantiate(spec))
    return str(spec)


class ConfigError(ValueError):
    """A setting that cannot work; entry points print its message without a traceback."""


def exit_on_config_error(job: Callable[[], T]) -> T:
    """Run an entry point's job; a bad setting ends it with its message and exit code 1, no traceback."""
    try:
        return job()
    except (ConfigError, MissingMandatoryValue) as err:
        logging.getLogger("dreambooth_pl").error("%s", err)
        sys.exit(1)
