"""Where weights come from: checks of local diffusers folders and hub ids, before anything loads.

Every check here fails in seconds with the option to change and how to get the weights offline; it imports
no model family, so the families and the pipeline loader build on it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.util.network import server_reachable

# What a folder without model_index.json is checked against (a Stable Diffusion pipeline's parts); one with
# it must have every part its model_index.json lists.
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Per kind of part, groups of file patterns of which each group needs a match (weights may be .bin, sharded
# or a variant such as .fp16.safetensors).
_WEIGHTS = ("*.safetensors", "*.bin")
REQUIRED_FILES = {
    "model": [("config.json",), _WEIGHTS],
    "tokenizer": [("*.json", "*.txt", "*.model")],
    "scheduler": [("scheduler_config.json",)],
}


def _part_kind(subfolder: str) -> str:
    return next((kind for kind in ("tokenizer", "scheduler") if subfolder.startswith(kind)), "model")


def pipeline_parts(folder: Path) -> list[str]:
    """The subfolders a pipeline folder must have: those its model_index.json names (optional parts that are
    null excluded), else a Stable Diffusion pipeline's."""
    index = folder / "model_index.json"
    if not index.is_file():
        return list(PIPELINE_SUBFOLDERS)
    entries = json.loads(index.read_text())
    return [k for k, v in entries.items() if isinstance(v, list) and len(v) == 2 and v[1] is not None]


INDEX_FILES = ("model_index.json", "config.json")  # a pipeline's, a single model's (DINO, CLIP)


class ModelNotReachable(ConfigError):
    """The configured weights are neither a local diffusers folder nor downloadable."""


def check_pretrained(pretrained: str) -> None:
    """Fail before any expensive work when a local folder is not a diffusers pipeline."""
    path = Path(pretrained).expanduser()
    looks_local = path.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        raise ModelNotReachable(f"model.pretrained={pretrained!r}: no such folder.")
    parts = pipeline_parts(path)
    missing = [name for name in ("model_index.json", *parts) if not (path / name).exists()]
    if missing:
        raise ModelNotReachable(
            f"model.pretrained={pretrained!r} is not a diffusers pipeline folder (missing: {', '.join(missing)}). "
            "Point it at a folder written by `StableDiffusionPipeline.save_pretrained`."
        )
    incomplete = [
        f"{sub}/ has no {' or '.join(patterns)}"
        for sub in parts
        for patterns in REQUIRED_FILES[_part_kind(sub)]
        if not any(next((path / sub).glob(pattern), None) for pattern in patterns)
    ]
    if incomplete:
        raise ModelNotReachable(
            f"model.pretrained={pretrained!r} is an incomplete diffusers pipeline folder: {'; '.join(incomplete)}. "
            "An interrupted download or copy? Copy the model again."
        )


def model_fingerprint(pretrained: str) -> str:
    """A digest of a model's contents, for caches of what it renders: a local folder is read as its
    files' names, sizes and modification times (and whole config files), so replacing the weights at the
    same path gives a new fingerprint; a hub id stands for itself (its revision is keyed separately)."""
    folder = Path(pretrained).expanduser()
    if not folder.is_dir():
        return f"hub:{pretrained}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        if path.suffix in (".json", ".txt"):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def download_hint(option: str, model_id: str = "<id>") -> str:
    """What to do when the Hub is out of reach, with the download command the installed huggingface_hub has."""
    return (
        f"Download the model where there is network access (`hf download {model_id} --local-dir /path`), "
        f"copy the folder here and set {option}=/path."
    )


def require_reachable(model_id: str, option: str, revision: str | None = None, timeout: float = 5.0) -> None:
    """Fail in seconds, before any work, when hub weights are neither cached nor downloadable.

    Local folders are checked where they are loaded. Without this, an unreachable Hub costs minutes of
    retries (and, for evaluation, comes after the whole training run).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if model_id.startswith((".", "/", "~")) or Path(model_id).expanduser().exists() or model_id.count("/") > 1:
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise ModelNotReachable(f"{option}={model_id!r}: no such folder ({folder.absolute()}).")
        if not any((folder / name).is_file() for name in INDEX_FILES):
            raise ModelNotReachable(
                f"{option}={model_id!r} is not a model folder (no {' or '.join(INDEX_FILES)}): an incomplete copy? "
                "Copy the model folder again."
            )
        return
    if any(isinstance(try_to_load_from_cache(model_id, name, revision=revision), str) for name in INDEX_FILES):
        return
    if constants.HF_HUB_OFFLINE:
        problem = "not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
    elif not server_reachable(constants.ENDPOINT, timeout):
        problem = f"not in the local Hugging Face cache ({constants.ENDPOINT} is not reachable)"
    else:
        return
    raise ModelNotReachable(
        f"{option}={model_id!r} is no local folder ({Path(model_id).absolute()}) and {problem}. "
        f"{download_hint(option, model_id)}"
    )


def from_pretrained_or_explain(cls, pretrained: str, subfolder: str | None, load: str = "from_pretrained", **kwargs):
    """`cls.from_pretrained` (or another loader of `cls`), with an error that says how to get it offline."""
    try:
        return getattr(cls, load)(pretrained, subfolder=subfolder, **kwargs)
    except OSError as err:
        option = "model.pretrained" if subfolder else "model.vae"
        part = f"'{subfolder}' of {option}" if subfolder else option
        if Path(pretrained).expanduser().is_dir():
            raise ModelNotReachable(
                f"{option}={pretrained!r} is a damaged model folder: {part} cannot be read "
                f"({str(err).splitlines()[0]}). A truncated or interrupted copy? Copy the model folder again."
            ) from None
        raise ModelNotReachable(
            f"Could not load {part}={pretrained!r}: {err}\n"
            f"{download_hint(option, pretrained)} Or use model=tiny, which needs no download."
        ) from err
