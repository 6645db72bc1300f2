"""Fine-tune a text-to-image model on a subject, DreamBooth style: `python train.py subject=teapot`."""

import hydra
from omegaconf import DictConfig

from dreambooth_pl.runs.sweeps import run_entry_point


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from dreambooth_pl.training.job import train  # imported here so that `--help` answers without loading torch

    run_entry_point(lambda: train(cfg), fail_fast=cfg.fail_fast)


if __name__ == "__main__":
    main()
