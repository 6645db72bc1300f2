"""python -m dreambooth_pl.toyworld: rebuild the toy world's models, subjects and probe (conf/toyworld.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dreambooth_pl.toyworld.pretrain import build


@hydra.main(version_base="1.3", config_path="../../conf", config_name="toyworld")
def main(cfg: DictConfig) -> None:
    build(cfg)


if __name__ == "__main__":
    main()
