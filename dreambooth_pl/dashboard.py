"""`python -m dreambooth_pl.dashboard`: a W&B report of a project's runs (reporting/)."""

from dreambooth_pl.reporting.dashboard import main

if __name__ == "__main__":
    main()
