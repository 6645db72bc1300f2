"""Render prompts with an exported pipeline: `python -m dreambooth_pl.generate pipeline=/path/to/pipeline`."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from dreambooth_pl.models.samples import generate
from dreambooth_pl.runs.layout import EXPORT_INFO
from dreambooth_pl.util.config import ConfigError, exit_on_config_error
from dreambooth_pl.util.threads import use_cpu_threads


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    def job() -> Path:
        folder = Path(cfg.generate.pipeline)  # Hydra has made the output folder beside it: it may exist, empty
        if not any((folder / name).is_file() for name in (EXPORT_INFO, "model_index.json")):
            raise ConfigError(
                f"generate.pipeline={cfg.generate.pipeline!r}: no exported model there (no {EXPORT_INFO} or "
                "model_index.json): pass a run's pipeline/, lora/ or textual_inversion/ folder."
            )
        use_cpu_threads(cfg.cpu_threads, cfg.generate.device)
        return generate(**hydra.utils.instantiate(cfg.generate, _convert_="all"))

    exit_on_config_error(job)


if __name__ == "__main__":
    main()
