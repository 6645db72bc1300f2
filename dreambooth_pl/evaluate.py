"""`python -m dreambooth_pl.evaluate run_dir=<run>`: the paper's metrics on a trained run (evaluation/).

The Hydra entry point lives here, beside conf/'s parent, so that `config_path` finds the project's configs."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from dreambooth_pl.evaluation.evaluate import evaluate_from_config, with_run_model
    from dreambooth_pl.util.config import exit_on_config_error

    exit_on_config_error(lambda: evaluate_from_config(with_run_model(cfg)))


if __name__ == "__main__":
    main()
