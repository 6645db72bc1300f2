"""`python -m dreambooth_pl.report <sweep folder or runs>`: the paper's tables from evaluated runs (reporting/)."""

from dreambooth_pl.reporting.report import main

if __name__ == "__main__":
    main()
