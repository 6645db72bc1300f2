"""A run folder is data, never code: what is read back from it (`.hydra/*.yaml`, a sweep's `multirun.yaml`)
is parsed as plain YAML, never resolved by OmegaConf and never instantiated.

Hydra's own files hold no YAML anchors and stay small: a file over `MAX_RECORD_BYTES` or with an alias
(a "billion laughs" bomb) is refused at once, naming it. Only light imports here: Hydra loads resume.py,
which uses this module, for every command.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.runs.layout import HYDRA_DIR, MULTIRUN, SAVED_CONFIG, SAVED_HYDRA
from dreambooth_pl.util.config import ConfigError

MAX_RECORD_BYTES = 1 << 20  # Hydra writes a few KiB; a megabyte is far beyond any real record
# `${key}` and `${hydra:key}`: references a saved config may resolve against itself and its hydra.yaml
REFERENCE = re.compile(r"\$\{(hydra:)?([A-Za-z_][\w.]*)\}")
MAX_REFERENCE_DEPTH = 8


def load_record(path: Path) -> Any:
    """A saved YAML file as plain data (dicts, lists, strings, numbers), or a ConfigError naming it."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than any record Hydra writes ({MAX_RECORD_BYTES})")
        text = path.read_text()
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ValueError("it uses YAML aliases (*name), which Hydra never writes")
        return yaml.safe_load(text)
    except Exception as err:  # OSError, yaml's and unicode errors
        raise ConfigError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Restore it from .hydra/history/, or start a new run folder."
        ) from None


def load_mapping(path: Path) -> dict:
    record = load_record(path)
    if not isinstance(record, dict):
        raise ConfigError(f"{path} is not a saved config (a mapping): {type(record).__name__}. Not going on.")
    return record


def load_multirun(sweep_dir: str | Path) -> dict | None:
    """A sweep's `multirun.yaml` (Hydra's record of the sweep) as plain data; None when it is not a sweep."""
    path = Path(sweep_dir) / MULTIRUN
    return load_mapping(path) if path.is_file() else None


def select(data: Any, dotted: str) -> Any:
    """The value at `a.b.c` of plain data, or None."""
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _plain(node: Any, config: dict, hydra: dict, depth: int = 0) -> Any:
    """`node` with `${key}` / `${hydra:key}` references looked up in the saved files (as Hydra would have
    answered them) and every other `${...}` (resolvers, the environment) kept as literal text."""
    if isinstance(node, dict):
        return {key: _plain(value, config, hydra, depth) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(value, config, hydra, depth) for value in node]
    if not isinstance(node, str) or "${" not in node:
        return node

    def look_up(match: re.Match) -> str:
        value = select(hydra, match[2]) if match[1] else select(config, match[2])
        if depth >= MAX_REFERENCE_DEPTH or value is None or isinstance(value, (dict, list)):
            return match[0]
        return str(_plain(value, config, hydra, depth + 1))

    whole = REFERENCE.fullmatch(node)
    if whole and depth < MAX_REFERENCE_DEPTH:  # a reference alone keeps the referenced value's type
        value = select(hydra, whole[2]) if whole[1] else select(config, whole[2])
        if value is not None and not isinstance(value, (dict, list)):
            return _plain(value, config, hydra, depth + 1)
    return REFERENCE.sub(look_up, node)


def _escape(node: Any) -> Any:
    """Every `${` left as text, so that OmegaConf reads it as a literal and never resolves it."""
    if isinstance(node, dict):
        return {key: _escape(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_escape(value) for value in node]
    return node.replace("${", "\\${") if isinstance(node, str) else node


def saved_run_config(run_dir: str | Path) -> DictConfig | None:
    """A training run's config from `<run>/.hydra/config.yaml` as data: references answered from the run's
    own files, anything else (`${oc.env:...}`, other resolvers) literal; nothing in it is instantiated, so an
    old run folder (targets of an earlier package layout) reads as well as a new one."""
    saved = Path(run_dir) / HYDRA_DIR
    if not (saved / SAVED_CONFIG).is_file():
        return None
    config = load_mapping(saved / SAVED_CONFIG)
    hydra = load_mapping(saved / SAVED_HYDRA).get("hydra", {}) if (saved / SAVED_HYDRA).is_file() else {}
    return OmegaConf.create(_escape(_plain(config, config, hydra if isinstance(hydra, dict) else {})))
