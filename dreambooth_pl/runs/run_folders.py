"""What a run may be pointed at, checked before anything is written (resume.RunFolder calls these).

- A run folder never lands in the project's source or shipped data, never holds them, and a default one
  stays under `paths.log_dir` whatever `subject.name` or `sweep_name` says; `paths.log_dir` is never in or
  around the project's own folders.
- An existing folder is used only when it is empty or a run folder; a run folder that holds training results
  only by the resume of that run. A sweep's folder likewise, and each job folder already in it.
- Every folder a run writes can be written (a probe, `files.check_writable`): a read-only one is named.
- A resume accepts from a saved `.hydra/overrides.yaml` only what the project's own configs could have
  produced (a closed world): `key=value` for keys the configs have, group choices that exist in `conf/`, plain
  values without `${...}` or instantiation keys, paths that stay in the run folder or the path roots.
- No value of the command's config reads an environment variable other than the project's own
  (util.config.guarded_env): refused here, before the variable could reach `.hydra/`, a log or W&B.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf

from dreambooth_pl.runs.layout import CHECKPOINTS, EXPORT_INFO, HYDRA_DIR, MULTIRUN, REWRITTEN, RUN_LOCK
from dreambooth_pl.runs.records import select
from dreambooth_pl.util.config import CONF_DIR, PROJECT_ROOT, ConfigError, EnvironmentRead
from dreambooth_pl.util.files import check_writable

INSTANTIATION_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
PLAIN_KEY = re.compile(r"[A-Za-z_][\w]*(\.[\w]+)*")
RUN_FOLDER_VALUES = ("${paths.output_dir}", "${hydra:runtime.output_dir}")  # a project value under the run folder
# the project's own folders: no run, sweep or paths.log_dir in or around them
SHIPPED = ("conf", "dreambooth_pl", "toyworld", "tests", "docs", "notebooks", ".git")
TRAINED = (f"{CHECKPOINTS}/*.ckpt", f"*/{EXPORT_INFO}")  # what a second run in the folder would overwrite


def _leaves(cfg: DictConfig | ListConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig | ListConfig, Any]]:
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        dotted = f"{prefix}.{key}" if prefix else str(key)
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_interpolation():
            yield from _leaves(node, dotted)
        else:
            yield dotted, cfg, key


def check_env_reads(config: DictConfig) -> None:
    """Every value of the command (and its run folder) resolved once: one that reads an environment variable
    the project does not name is refused, naming the option. Values that cannot be resolved yet
    (`${hydra:runtime...}`) are left to the job."""
    for dotted, parent, key in _leaves(config):
        if dotted.startswith("hydra.") and dotted not in ("hydra.run.dir", "hydra.sweep.dir"):
            continue
        try:
            parent[key]
        except Exception as err:
            cause = err
            while cause is not None and not isinstance(cause, EnvironmentRead):
                cause = cause.__context__
            if cause is not None:
                raise ConfigError(f"{dotted}: {cause}") from None


def path_roots(config: DictConfig) -> dict[str, Path]:
    """The folders this command's own config points the data at (never a run folder's say-so)."""
    paths = config.paths
    return {
        "paths.toyworld_dir": Path(paths.toyworld_dir).resolve(),
        "paths.cache_dir": Path(paths.cache_dir).resolve(),
        "paths.dreambooth_root": Path(paths.dreambooth_root).resolve(),
    }


def inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def check_location(config: DictConfig, folder: Path, option: str, default: bool) -> None:
    """Refuse a run (or sweep) folder `option` in the project's source or data, or a default one that a
    name (`subject.name`, `sweep_name`) moved out of `paths.log_dir`."""
    log_dir = Path(config.paths.log_dir).resolve()
    for name in SHIPPED:
        shipped = PROJECT_ROOT / name
        if inside(log_dir, shipped) or inside(shipped, log_dir):
            raise ConfigError(
                f"paths.log_dir={log_dir} {'is in' if inside(log_dir, shipped) else 'holds'} the project's "
                f"{name}/: runs would write among its files. Leave out paths.log_dir (the project's logs/) or "
                "choose a folder outside the project's source and data."
            )
    in_logs = folder != log_dir and folder.is_relative_to(log_dir)
    if default and not in_logs:
        named = "sweep_name" if option == "hydra.sweep.dir" else "subject.name"
        raise ConfigError(
            f"The run folder {folder} is not under paths.log_dir ({log_dir}): {named}="
            f"{OmegaConf.select(config, named)!r} becomes part of its path. Use a plain name (no '/' or '..')."
        )
    roots = path_roots(config)
    protected = {
        "the project's source": PROJECT_ROOT,
        "the toy world (paths.toyworld_dir)": roots["paths.toyworld_dir"],
        "the shared cache (paths.cache_dir)": roots["paths.cache_dir"],
        "the dataset (paths.dreambooth_root)": roots["paths.dreambooth_root"] / "dataset",
    }
    for what, data in protected.items():
        if data == PROJECT_ROOT and in_logs and inside(log_dir, data):
            continue  # the project's logs/ is where run folders belong
        if inside(folder, data) or inside(data, folder):
            raise ConfigError(
                f"The run folder {folder} {'is in' if inside(folder, data) else 'holds'} {what} ({data}): a run "
                f"would overwrite files there. Leave out {option} (a new folder under {log_dir}) or choose a "
                "folder outside it."
            )


def check_run_folder(config: DictConfig, run_dir: Path, resuming: bool, default_dir: bool) -> None:
    """Refuse a run folder where a run would overwrite something it does not own, or cannot write."""
    check_location(config, run_dir, "hydra.run.dir", default_dir)
    check_owned(run_dir, resuming, "hydra.run.dir")
    check_writable(run_dir, "The run folder", "choose another hydra.run.dir", REWRITTEN)


def check_sweep_folder(config: DictConfig, sweep_dir: Path, default_dir: bool) -> None:
    """A sweep's folder obeys a run folder's rules, and so does each job folder already in it, before any job
    trains: an existing sweep folder is reused (a failed job run again) but never one of its trained jobs
    overwritten, unless `ckpt_path=last` resumes them."""
    check_location(config, sweep_dir, "hydra.sweep.dir", default_dir)
    entries = contents(sweep_dir)
    if any(p.is_file() or contents(p) for p in entries) and not (sweep_dir / MULTIRUN).is_file():
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir} is not empty and is not a sweep folder (no {MULTIRUN}): its jobs would "
            "overwrite its files. Choose an empty or new folder."
        )
    # a job's folder (`hydra.sweep.subdir`: its number) or a run folder; not report/ or the control rows
    jobs = [p.name for p in entries if p.is_dir() and (p.name.isdigit() or (p / HYDRA_DIR).is_dir())]
    for job in jobs:
        check_owned(sweep_dir / job, config.get("ckpt_path") == "last", "hydra.sweep.dir")
    rewritten = (MULTIRUN, *(f"{job}/{name}" for job in jobs for name in REWRITTEN))
    check_writable(sweep_dir, "The sweep folder", "choose another hydra.sweep.dir", rewritten)


def contents(folder: Path) -> list[Path]:
    """A folder's entries but a run's lock (its own check says whether a run holds it)."""
    return [p for p in folder.iterdir() if p.name != RUN_LOCK] if folder.is_dir() else []


def check_owned(run_dir: Path, resuming: bool, option: str) -> None:
    """Refuse a folder that is not empty and not a run folder, or a trained run's unless `resuming` it."""
    entries = contents(run_dir)
    if entries and not (run_dir / HYDRA_DIR).is_dir():
        raise ConfigError(
            f"{option}: {run_dir} is not empty and is not a run folder (no .hydra/): a run would overwrite "
            "its files. Choose an empty or new folder."
        )
    trained = [str(p.relative_to(run_dir)) for pattern in TRAINED for p in sorted(run_dir.glob(pattern))]
    if entries and trained and not resuming:
        raise ConfigError(
            f"{run_dir} holds a trained run ({', '.join(trained[:3])}); a new run there would overwrite it. To "
            f"train it further: python train.py hydra.run.dir={run_dir} ckpt_path=last [trainer.max_steps=N]. "
            f"To start a new run: leave out {option}, or give a new folder."
        )


def _paired(value: Any, base: Any, dotted: str) -> Iterator[tuple[str, Any, Any]]:
    """Every leaf of an override's value with the project's own (unresolved) value at the same key."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paired(item, base.get(key) if isinstance(base, dict) else None, f"{dotted}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paired(item, None, f"{dotted}[{index}]")
    else:
        yield dotted, value, base


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


def _path_problem(text: str, base: Any, run_dir: Path, roots: dict[str, Path]) -> str | None:
    in_run = isinstance(base, str) and any(ref in base for ref in RUN_FOLDER_VALUES)
    looks_like_path = text.startswith(("/", "~", ".")) or "/../" in text or text.endswith("/..")
    if not (in_run or looks_like_path):
        return None
    path = Path(text).expanduser().resolve()
    if in_run:
        return None if inside(path, run_dir) else f"a path outside the run folder ({path}) where the run writes"
    if inside(path, run_dir) or any(inside(path, root) for root in roots.values()):
        return None
    return f"a path outside the run folder and {', '.join(roots)} ({path})"


def check_closed_world(
    overrides: list[str | None], source: Path, compose_groups: Callable[[], DictConfig], run_dir: Path, roots: dict
) -> None:
    """Refuse any saved override the project's own configs could not have produced (module docstring); None
    entries are set again by the command. `compose_groups`: the project's configs with the saved group
    choices, composed only once every entry has passed the checks that need no config."""
    parser = OverridesParser.create()
    parsed = {}
    for number, text in enumerate(overrides, 1):
        if text is None:
            continue
        if "${" in text:
            _refuse(source, number, text, "an interpolation or resolver (${...}), which a saved record may not hold")
        try:
            parsed[number] = parser.parse_override(text)
        except Exception as err:  # the override grammar's errors
            _refuse(source, number, text, f"does not parse ({type(err).__name__}: {str(err).splitlines()[0]})")
        _refuse(source, number, text, _problem(parsed[number]))
    project = OmegaConf.to_container(compose_groups(), resolve=False)
    for number, override in parsed.items():
        key = override.key_or_group
        if (CONF_DIR / key).is_dir():
            continue
        for dotted, leaf, base in _paired(override.value(), select(project, key), key):
            problem = _path_problem(leaf, base, run_dir, roots) if isinstance(leaf, str) else None
            _refuse(source, number, overrides[number - 1], problem and f"{dotted} is {problem}")


def _refuse(source: Path, number: int, text: str, problem: str | None) -> None:
    if problem:
        raise ConfigError(
            f"{source}, entry {number} ({text!r}): {problem}. A run folder is data: a resume accepts only what "
            "the project's configs could have produced. Not resuming; nothing in the folder was changed. Give "
            "the setting on the command line if you trust it, or start a new run folder."
        )


def _problem(override) -> str | None:
    """What makes one saved override something the project's configs could not have produced, if anything."""
    key = override.key_or_group
    if override.is_add() or override.is_force_add():
        return "adds a key (+) that the project's configs do not have"
    if override.is_delete() or override.is_sweep_override() or override.package is not None:
        return "not a plain key=value"
    if not PLAIN_KEY.fullmatch(key) or key.split(".")[0] == "hydra":
        return f"{key!r} is not an option of the project's configs"
    value = override.value()
    if (CONF_DIR / key).is_dir():
        options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        if value is not None and value not in options:
            return f"{key}={value!r} is not one of conf/{key}/ ({', '.join(options)})"
        return None
    bad = [k for k in [key.split(".")[-1], *_keys(value)] if k in INSTANTIATION_KEYS]
    return f"{bad[0]} would instantiate code" if bad else None
