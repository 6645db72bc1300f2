"""Fine-tune a text-to-image model on a subject, DreamBooth style: `python train.py subject=teapot`."""

import hydra
from omegaconf import DictConfig

from dreambooth_pl.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
