"""A W&B report for one sweep with the paper's panels: `python -m dreambooth_pl.dashboard <sweep folder>`.

Loss curves and DINO / CLIP-I / CLIP-T / PRES / DIV grouped by the swept values, a parallel-coordinates
panel of swept values against the metrics, the sample and evaluation grids and the evaluation image table.
The runs are found from each job's W&B record (`<job>/wandb/dreambooth_run.json`, see loggers.py), the
swept keys from the sweep's `multirun.yaml`. Online (credentials and a reachable server) the report is
saved with W&B's report API (`pip install -e ".[dashboard]"`, wandb-workspaces); offline the command prints
the specification it would create, as JSON, and creates nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dreambooth_pl.runs.layout import MULTIRUN, WANDB_DIR, metrics_file
from dreambooth_pl.runs.loggers import read_wandb_run, swept_keys, wandb_base_url, wandb_credentials_present
from dreambooth_pl.util.network import server_reachable

EVAL_METRICS = {"eval/dino": "DINO", "eval/clip_i": "CLIP-I", "eval/clip_t": "CLIP-T", "eval/pres": "PRES"}
EVAL_METRICS["eval/div"] = "DIV"
EVAL_GRIDS = ["eval/grid", "eval/pres_grid"]  # a key each (evaluate.py): W&B wants one image size per key
LOSSES = ["train/loss", "train/instance_loss", "train/prior_loss"]


def dashboard_spec(sweep_dir: str | Path) -> dict:
    """What the report holds, as plain data: printed offline, turned into W&B's report objects online."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / MULTIRUN).is_file():
        raise FileNotFoundError(f"{sweep_dir}: no {MULTIRUN}; pass a sweep folder (python train.py -m ...).")
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / WANDB_DIR).is_dir()), key=lambda p: p.name)
    records = [record for job in jobs if (record := read_wandb_run(job))]
    if not records:
        raise FileNotFoundError(f"{sweep_dir}: no job logged to W&B (run the sweep with logger=wandb).")
    groups = sorted({r["group"] for r in records})
    swept = swept_keys(sweep_dir)
    group_by = [f"config.{key}" for key in swept]
    return {
        "title": f"DreamBooth sweep {', '.join(groups)}",
        "description": f"{len(records)} runs; swept: {', '.join(swept) or 'nothing'}",
        "project": records[0]["project"],
        "runset": {"name": "sweep", "group": groups, "runs": [r["id"] for r in records], "group_by": group_by},
        "panels": [
            {"type": "line", "title": "Training losses", "x": "trainer/global_step", "y": LOSSES, "group_by": group_by},
            *(
                {"type": "bar", "title": f"{label} by {', '.join(swept)}", "metric": key, "group_by": group_by}
                for key, label in EVAL_METRICS.items()
            ),
            {"type": "parallel_coordinates", "title": "Swept values vs metrics", "columns": [*swept, *EVAL_METRICS]},
            {"type": "media", "title": "Sample and evaluation grids", "keys": ["samples", *EVAL_GRIDS]},
            {"type": "table", "title": "Evaluation images", "key": "eval/images"},
        ],
    }


def unevaluated_jobs(sweep_dir: str | Path) -> list[Path]:
    """Jobs that logged to W&B but have no evaluation (eval/metrics.json): their metric panels stay empty."""
    jobs = [p for p in Path(sweep_dir).iterdir() if read_wandb_run(p)]
    return sorted((job for job in jobs if not metrics_file(job).is_file()), key=lambda p: p.name)


def build_report(spec: dict, entity: str):
    """W&B's report objects (wandb-workspaces) for a spec; nothing is sent until `.save()`."""
    import wandb_workspaces.reports.v2 as wr

    group_by = spec["runset"]["group_by"]
    panel_types = {
        "line": lambda p: wr.LinePlot(title=p["title"], x=p["x"], y=p["y"], groupby=group_by[0] if group_by else None),
        "bar": lambda p: wr.BarPlot(title=p["title"], metrics=[p["metric"]], groupby=group_by[0] if group_by else None),
        "parallel_coordinates": lambda p: wr.ParallelCoordinatesPlot(
            title=p["title"],
            columns=[
                wr.ParallelCoordinatesPlotColumn(metric=c if c.startswith("eval/") else f"c::{c}") for c in p["columns"]
            ],
        ),
        "media": lambda p: wr.MediaBrowser(title=p["title"], media_keys=p["keys"]),
        "table": lambda p: wr.WeavePanelSummaryTable(table_name=p["key"]),
    }
    runs = " or ".join(f'Group = "{g}"' for g in spec["runset"]["group"])
    runset = wr.Runset(entity=entity, project=spec["project"], name="sweep", filters=runs, groupby=group_by)
    grid = wr.PanelGrid(runsets=[runset], panels=[panel_types[p["type"]](p) for p in spec["panels"]])
    return wr.Report(
        entity=entity, project=spec["project"], title=spec["title"], description=spec["description"], blocks=[grid]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_pl.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="a sweep folder: logs/train/multiruns/<time>")
    parser.add_argument("--entity", default=None, help="W&B entity (default: your default entity)")
    args = parser.parse_args(argv)
    try:
        spec = dashboard_spec(args.sweep_dir)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    if missing := unevaluated_jobs(args.sweep_dir):
        print(
            f"warning: {len(missing)} run(s) logged no eval metrics, so the DINO / CLIP-I / CLIP-T / PRES / DIV "
            "panels miss them. Evaluate them first: "
            f"python -m dreambooth_pl.evaluate -m run_dir={','.join(map(str, missing))}",
            file=sys.stderr,
        )
    if not (wandb_credentials_present() and server_reachable(wandb_base_url(), timeout=5)):
        print(
            f"W&B is not reachable (no credentials or no network): would create this report in project "
            f"{spec['project']!r} once the runs are synced (`wandb sync <job>/wandb/offline-run-*`):"
        )
        print(json.dumps(spec, indent=2))
        return
    import wandb

    report = build_report(spec, args.entity or wandb.Api().default_entity)
    report.save()
    print(f"Created the W&B report: {report.url}")


if __name__ == "__main__":
    main()
