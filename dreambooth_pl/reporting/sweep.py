"""The sweep's report, a Hydra callback (conf/report/sweep.yaml): when the sweep ends, the control rows are
evaluated on the swept subjects, the report is written into `<sweep dir>/report` and summed up on the console."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dreambooth_pl.reporting.controls import BASE_ROW, ControlJob, World, control_rows
from dreambooth_pl.reporting.render import console_summary
from dreambooth_pl.reporting.report import read_runs, write_report
from dreambooth_pl.runs.layout import REPORT_DIR


class SweepReport(Callback):
    """The base model prompted with the runs' identifier is Table 1's reference row and the language-drift
    grid's first row; each world in `worlds` adds its own control rows for the subjects it knows (the toy
    world: the base model prompted with the subject's attribute words, the renderer's ground truth and its
    look-alike). `base_model` None evaluates no control row. Control evaluations are kept in `cache_dir`
    (evaluation/cache.py), so a later sweep over the same subjects copies them; None renders them each time."""

    def __init__(
        self, base_model: str | dict | None = None, worlds: dict[str, World] | None = None, cache_dir: str | None = None
    ) -> None:
        self.base_model = base_model
        self.worlds = list((worlds or {}).values())
        self.cache_dir = cache_dir

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs, _ = read_runs([sweep_dir], self.worlds)
        if not runs:
            print(f"[report] no evaluated runs under {sweep_dir}: nothing to report")
            return
        written = write_report([sweep_dir], sweep_dir / REPORT_DIR, self.worlds)  # a stop during the controls keeps it
        if self.base_model:
            self.evaluate_controls(config, sweep_dir, [r for r in runs if not r["control"]])
            written = write_report([sweep_dir], sweep_dir / REPORT_DIR, self.worlds)
            runs, _ = read_runs([sweep_dir], self.worlds)
        print(f"[report] {console_summary(runs, control_rows(self.worlds, runs))}")
        print(f"[report] {written['report']}")

    def evaluate_controls(self, config: DictConfig, sweep_dir: Path, runs: list[dict]) -> None:
        """Every control row of every swept subject, into `<sweep dir>/<method>/<subject>`."""
        from dreambooth_pl.evaluation.cache import evaluate_cached  # diffusers and transformers load only here
        from dreambooth_pl.util.config import resolve_path
        from dreambooth_pl.util.threads import use_cpu_threads

        base_model = resolve_path(self.base_model)  # a folder, or the tiny model's `_target_` that builds one
        eval_cfg = OmegaConf.to_container(config.eval, resolve=True)
        use_cpu_threads(config.cpu_threads, eval_cfg["device"])  # a launcher may have run the jobs elsewhere
        model = OmegaConf.select(config, "model.name")
        for subject in sorted({r["subject"] for r in runs}):
            run = next(r for r in runs if r["subject"] == subject)
            jobs = [ControlJob(BASE_ROW.method, run["identifier"])]
            jobs += [job for world in self.worlds for job in world.control_jobs(run)]
            for job in jobs:
                evaluate_cached(
                    self.cache_dir,
                    base_model if job.producer is None else None,
                    str(sweep_dir / job.method / subject),
                    eval_cfg,
                    run["real_images_dir"],
                    subject,
                    run["class_noun"],
                    job.identifier,
                    provenance={"method": job.method, "model": model, "steps": 0, "control": True},
                    producer=job.producer,
                )
