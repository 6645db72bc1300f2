"""Small helpers for reading the Hydra config."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from omegaconf.resolvers.oc import env as oc_env

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


def non_finite(cfg: DictConfig, prefix: str = "") -> list[str]:
    """A problem line for every NaN or infinite number in the config (NaN > 0 is False: it would pass every
    range check and silently switch things off)."""
    problems = []
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        option = f"{prefix}.{key}" if prefix else str(key)
        if option == "hydra":
            continue
        try:
            value = cfg[key]
        except Exception:  # a value that does not resolve here is checked where it is used
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            problems += non_finite(value, option)
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{option}={value} must be a finite number")
    return problems


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder of train.py and conf/
CONF_DIR = PROJECT_ROOT / "conf"


class EnvironmentRead(ConfigError):
    """An interpolation asked for an environment variable that the project's configs do not read."""


@functools.cache
def readable_env() -> frozenset[str]:
    """The environment variables the project's own configs read (`${oc.env:NAME,...}` in conf/): path roots."""
    found = set()
    for path in CONF_DIR.rglob("*.yaml"):
        found.update(re.findall(r"\$\{oc\.env:([A-Za-z_]\w*)", path.read_text()))
    return frozenset(found)


def guarded_env(key: str, *default):
    """`${oc.env:...}` for the variables the project's configs name, and nothing else: a value typed as
    `${oc.env:SECRET}` in an override, tag or name would otherwise be copied into `.hydra/`, logs and W&B."""
    if key not in readable_env():
        raise EnvironmentRead(
            f"${{oc.env:{key}}}: a run reads only the environment variables its configs name "
            f"({', '.join(sorted(readable_env()))}), so that no other variable's value (an API key, a token) is "
            "ever copied into its records. Write the value itself instead."
        )
    return oc_env(key, *default)


def register_resolvers() -> None:
    """`${project_root:}`: default paths (conf/paths) are read against the project, not the working directory;
    `${oc.env:...}` reads only the project's own variables (`guarded_env`)."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    OmegaConf.register_new_resolver("oc.env", guarded_env, replace=True)


@functools.cache
def log_paths(dreambooth_root: str, toyworld_dir: str, cache_dir: str, log_dir: str) -> None:
    """Where the defaults point, said once per process (a sweep's jobs share it)."""
    logging.getLogger("dreambooth_pl").info(
        "Paths: DreamBooth dataset %s, toy world %s, cache %s, logs %s",
        *(os.path.abspath(p) for p in (dreambooth_root, toyworld_dir, cache_dir, log_dir)),
    )
