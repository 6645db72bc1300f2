"""The run folder's contract: every file and folder a run, its evaluation and a sweep write, named once.

Every reader and writer takes its names from here. Names are relative to the run folder (a sweep's to the
sweep folder). One place is the config's, not this module's: the checkpoint folder is
`callbacks.checkpoint.dirpath` (conf/callbacks/default.yaml); `checkpoint_dir` reads it.

    <run>/
      .hydra/{config,hydra,overrides}.yaml   Hydra's record of the command; .hydra/history/<n>/ on resume
      .run.lock                               the pid of the process using the folder
      train.log
      checkpoints/last.ckpt                   (callbacks.checkpoint.dirpath)
      pipeline/ | lora/ | textual_inversion/  the export, with dreambooth.json (one per method)
      samples/  final_samples/                grids during training, images of the exported model
      eval/metrics.json  eval/images/         the evaluation; eval_history/<n>/ an earlier model's
      validation/{metrics.csv,selected.json}  the validation curve and its selected step
      wandb/dreambooth_run.json               the W&B run a resume and an evaluation continue
      job_failed.json                         (a sweep's job) its overrides and error
    <sweep>/
      multirun.yaml  <job number>/  report/
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

HYDRA_DIR = ".hydra"
SAVED_CONFIG, SAVED_HYDRA, SAVED_OVERRIDES = "config.yaml", "hydra.yaml", "overrides.yaml"  # in HYDRA_DIR
RECORD_FILES = (SAVED_CONFIG, SAVED_HYDRA, SAVED_OVERRIDES)
HYDRA_HISTORY = "history"  # in HYDRA_DIR: the records a resume replaced
RUN_LOCK = ".run.lock"
TRAIN_LOG = "train.log"

CHECKPOINTS = "checkpoints"  # the default; the config's callbacks.checkpoint.dirpath decides
LAST_GOOD_CHECKPOINT = "last-good.ckpt"  # the weights before a non-finite loss

EXPORT_INFO = "dreambooth.json"  # in an export folder: what the model was trained from and how
PIPELINE = "pipeline"  # a fine-tuned pipeline's export (also a LoRA merged into one)
LORA_DIR = "lora"  # a LoRA's adapters
TEXTUAL_INVERSION_DIR = "textual_inversion"  # a learned embedding
SAMPLES = "samples"
FINAL_SAMPLES = "final_samples"

EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"  # in EVAL_DIR
EVAL_HISTORY = "eval_history"
EVAL_IMAGES = "images"  # in EVAL_DIR: the rendered images and their manifest.json
EVAL_LOCK = ".lock"  # in EVAL_IMAGES

VALIDATION_DIR = "validation"
VALIDATION_CURVE = "metrics.csv"  # in VALIDATION_DIR: one row per validated step, step 0 the base model
VALIDATION_SELECTED = "selected.json"  # in VALIDATION_DIR: the step the validation selected
TRADEOFF_FIGURE = "tradeoff.png"  # in a report folder

WANDB_DIR = "wandb"
WANDB_RUN = "dreambooth_run.json"  # in WANDB_DIR: id, name, group, job type and project of the W&B run

MULTIRUN = "multirun.yaml"  # in a sweep folder: Hydra's record of the sweep
JOB_FAILED = "job_failed.json"  # in a sweep job's folder
REPORT_DIR = "report"  # in a sweep folder (the default of `python -m dreambooth_pl.report <sweep>`)

# the files written in place, not by atomic rename: a read-only one stops a run (or an evaluation) up front
REWRITTEN = (
    *(f"{HYDRA_DIR}/{name}" for name in RECORD_FILES),
    RUN_LOCK,
    TRAIN_LOG,
    f"{EVAL_DIR}/{EVAL_IMAGES}/{EVAL_LOCK}",
)


def saved_config(run_dir: str | Path) -> Path:
    return Path(run_dir) / HYDRA_DIR / SAVED_CONFIG


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVAL_DIR / METRICS_FILE


def wandb_run_file(save_dir: str | Path) -> Path:
    return Path(save_dir) / WANDB_DIR / WANDB_RUN


def exports(run_dir: str | Path) -> list[Path]:
    """The export folders of a run: its subfolders holding a EXPORT_INFO."""
    return sorted(path.parent for path in Path(run_dir).glob(f"*/{EXPORT_INFO}"))


def checkpoint_dir(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Where the run's checkpoints go: the config's `callbacks.checkpoint.dirpath`, or CHECKPOINTS in the
    run folder when the config has no checkpoint callback."""
    return Path(OmegaConf.select(cfg, "callbacks.checkpoint.dirpath", default=None) or Path(output_dir) / CHECKPOINTS)
