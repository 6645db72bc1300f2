"""`python -m dreambooth_pl.evaluate run_dir=<run>`: the paper's metrics on a trained run (evaluation/)."""

from dreambooth_pl.evaluation.evaluate import main

if __name__ == "__main__":
    main()
