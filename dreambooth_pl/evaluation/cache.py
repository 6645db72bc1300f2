"""Evaluations nothing a sweep trains can change, kept in the shared cache (`paths.cache_dir`).

The base model's row and the toy world's control rows render and score the same images in every sweep over
the same subjects. Each whole `eval/` folder (images, grids, metrics.json) is stored under a key of what made
it: the model's contents (or the image producer's fingerprint), the evaluation settings with the readers' contents,
the real photos' contents, the subject and prompt words. A later evaluation with the same key copies the
folder instead of rendering, so its metrics are the same bytes. Entries appear whole by atomic rename, and
one process at a time fills an entry (the class-image cache's conventions: training/class_images.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.evaluation.evaluate import evaluate_run
from dreambooth_pl.evaluation.render import ImageProducer
from dreambooth_pl.models.hub import model_fingerprint
from dreambooth_pl.runs.export import write_dir_atomically
from dreambooth_pl.runs.layout import EVAL_DIR, METRICS_FILE
from dreambooth_pl.util.files import ProcessLock, atomic_file

log = logging.getLogger(__name__)

KEY_FILE = "key.json"  # beside metrics.json: what the evaluation was made from
# the evaluation's files outside the run: read by their contents (a rebuilt reader is a new key)
READER_OPTIONS = ("prompts_file", "dino.model", "clip.model", "div.vae", "div.lpips_net")


def _contents(path: str | None) -> dict | str | None:
    """A file or folder as its absolute path (metrics.json records it) and a digest of its contents; a name
    that is no local path (a hub id) as itself."""
    target = Path(path).expanduser() if path else None
    if target is None or not target.exists():
        return path
    digest = hashlib.sha256(target.read_bytes()).hexdigest()[:16] if target.is_file() else model_fingerprint(path)
    return {"path": str(target.resolve()), "contents": digest}


def evaluation_key(
    pipeline_dir: str | None,
    eval_cfg: dict,
    real_images_dir: str,
    subject: str,
    class_noun: str,
    identifier: str,
    provenance: dict | None,
    producer: ImageProducer | None,
) -> dict:
    """Everything that decides an `evaluate_run`'s files (its arguments, read as contents where they are files)."""
    options = OmegaConf.create(eval_cfg)
    readers = {name: _contents(OmegaConf.select(options, name)) for name in READER_OPTIONS}
    return {
        "model": producer.fingerprint() if producer is not None else _contents(pipeline_dir),
        "eval": eval_cfg,
        "readers": readers,
        "device": torch.device(eval_cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")).type,
        "real_images": _contents(real_images_dir),
        "subject": subject,
        "class_noun": class_noun,
        "identifier": identifier,
        "run_meta": provenance,  # key.json's key since its first version (cached entries keep hitting)
    }


def _copy(source: Path, target: Path) -> Path:
    """`target` replaced whole by a copy of `source` (hidden files, i.e. locks and temporaries, left out)."""

    def write(staging: Path) -> None:
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)

    return write_dir_atomically(target, write)


def evaluate_cached(
    cache_dir: str | None,
    pipeline_dir: str | None,
    output_dir: str,
    eval_cfg: DictConfig | dict,
    real_images_dir: str,
    subject: str,
    class_noun: str,
    identifier: str,
    provenance: dict | None = None,
    producer: ImageProducer | None = None,
) -> dict:
    """`evaluate_run` of an untrained model or a world's image producer, from `cache_dir` when it holds the same key
    (`cache_dir` None: always evaluated). Returns what `evaluate_run` does; `generated` is 0 on a hit."""
    args = (real_images_dir, subject, class_noun, identifier)
    if cache_dir is None:
        return evaluate_run(pipeline_dir, output_dir, eval_cfg, *args, provenance=provenance, producer=producer)
    settings = eval_cfg if isinstance(eval_cfg, dict) else OmegaConf.to_container(eval_cfg, resolve=True)
    key = evaluation_key(pipeline_dir, settings, *args, provenance, producer)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{subject}-{(provenance or {}).get('method', 'base')}"
    entry = Path(cache_dir) / f"{''.join(c if c.isalnum() or c in '_-' else '_' for c in name)[:60]}-{digest}"
    eval_dir = Path(output_dir) / EVAL_DIR
    entry.parent.mkdir(parents=True, exist_ok=True)
    with ProcessLock(entry.parent / f"{entry.name}.lock", f"the cached evaluation {entry.name}"):
        if (entry / METRICS_FILE).is_file():
            log.info("Evaluation of %s (%s) found in %s: copied, nothing rendered", subject, entry.name, entry)
            _copy(entry, eval_dir)
            metrics = json.loads((eval_dir / METRICS_FILE).read_text())["metrics"]
            return {
                "eval_dir": str(eval_dir),
                "metrics_file": str(eval_dir / METRICS_FILE),
                "generated": 0,
                **metrics,
            }
        result = evaluate_run(pipeline_dir, output_dir, settings, *args, provenance=provenance, producer=producer)
        with atomic_file(eval_dir / KEY_FILE, "w") as handle:
            json.dump(key, handle, indent=2, sort_keys=True)
        _copy(eval_dir, entry)
        return result
