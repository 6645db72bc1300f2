"""python -m dreambooth_pl.toyworld: rebuild the toy world's models, subjects and probe (conf/toyworld.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dreambooth_pl.toyworld.pretrain import build
from dreambooth_pl.util.config import exit_on_config_error


@hydra.main(version_base="1.3", config_path="../../conf", config_name="toyworld")
def main(cfg: DictConfig) -> None:
    exit_on_config_error(lambda: build(cfg))


if __name__ == "__main__":
    main()
