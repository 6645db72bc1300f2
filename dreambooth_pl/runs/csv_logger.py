"""A CSV logger that a killed and resumed run keeps writing, in the same file, without gaps or repeats."""

from __future__ import annotations

import csv
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from dreambooth_pl.util.files import atomic_file


class _ResumingWriter(ExperimentWriter):
    """Keeps the rows already on disk (Lightning's writer deletes them), except those at or after the first
    step logged by this process: a resumed run logs those steps again."""

    def __init__(self, log_dir: str):
        self._first_log = True
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Lightning's version deletes an existing metrics file; a resume continues it."""

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        if self._first_log:
            self._first_log = False
            self._drop_rows_from(step)
        super().log_metrics(metrics_dict, step)

    def _drop_rows_from(self, step: int | None) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [row for row in reader if step is not None and int(float(row["step"])) < step]
            self.metrics_keys = sorted(reader.fieldnames or [])
        with atomic_file(self.metrics_file_path, "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` with one version per run folder (0) that a resume continues.

    Lightning writes the rows to disk as they are logged; after a kill, the resumed run drops the rows
    past its checkpoint and appends from there, so metrics.csv reads as one uninterrupted run's (Lightning's
    own logger would start a new version, or delete the file when given the same one). Lightning logs a
    step's row just after that step's checkpoint: a kill in between loses that one row.
    """

    def __init__(self, save_dir: str, name: str = "csv", version: int | str = 0, **kwargs: Any):
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment
