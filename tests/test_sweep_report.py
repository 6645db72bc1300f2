"""What a newcomer reads at a sweep's end: controls counted apart, only the tables the axes fill, intervals
only where subjects pair, the console summary, the trade-off overlay; and the toy world as a plug-in."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from dreambooth_pl.reporting.controls import ControlRow, configured_worlds
from dreambooth_pl.reporting.report import write_report
from dreambooth_pl.reporting.sweep import SweepReport
from dreambooth_pl.toyworld.controls import ToyWorld
from tests.conftest import REPO
from tests.test_report import write_run


class HandWorld:
    """A world with a ceiling and a baseline, as the toy world registers its rows (no evaluations here)."""

    controls = (
        ControlRow("oracle", "Oracle", "drawn by hand", ceiling=True),
        ControlRow("words", "Words", "{model}, prompted with words"),
    )

    def control_jobs(self, run: dict) -> list:
        return []

    def reader_notes(self, runs: list[dict]) -> list:
        return []


def control(root: Path, method: str, subject: str, dino: float) -> Path:
    return write_run(root, f"{method}-{subject}", subject, dino, method=method, prior_weight=None, prior_enabled=None)


def two_subject_sweep(root: Path) -> Path:
    """DreamBooth (lambda 1) on s1 and s2, and the controls base, oracle and words on both."""
    for subject, dino, base, oracle, words in (("s1", 0.6, 0.1, 0.9, 0.2), ("s2", 0.8, 0.5, 0.95, 0.3)):
        write_run(root, f"db-{subject}", subject, dino)
        control(root, "base", subject, base)
        control(root, "oracle", subject, oracle)
        control(root, "words", subject, words)
    return root


def test_control_rows_are_counted_apart_labelled_and_compared_by_their_rank(tmp_path):
    sweep = two_subject_sweep(tmp_path / "sweep")
    written = write_report([sweep], tmp_path / "report", [HandWorld()])
    text = written["report"].read_text()
    assert "2 trained runs and 6 control evaluations (Base model, Oracle, Words) of 2 subjects, from" in text
    assert "| ours | Oracle (drawn by hand; control) | 2 | 2 | 0.925 ± 0.025 |" in text
    assert "| ours | Words (sd15, prompted with words; control) | 2 | 2 |" in text
    paired = {(r["comparison"], r["metric"]): r for r in csv.DictReader(written["paired"].open())}
    db, base = "DreamBooth (sd15, PPL λ=1)", "Base model (sd15, no fine-tuning; control)"
    oracle, words = "Oracle (drawn by hand; control)", "Words (sd15, prompted with words; control)"
    # the ceiling first, then the method, the world's baseline, the base model last
    assert {c for c, m in paired if m == "dino"} == {
        f"{oracle} − {db}",
        f"{oracle} − {words}",
        f"{oracle} − {base}",
        f"{db} − {words}",
        f"{db} − {base}",
        f"{words} − {base}",
    }
    # DreamBooth - base per subject: 0.5, 0.3; mean 0.4, sd 0.1414214, se 0.1, t(0.975, 1) = 12.706205
    row = paired[(f"{db} − {base}", "dino")]
    half = 12.706205 * 0.1
    assert float(row["mean"]) == pytest.approx(0.4)
    assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((0.4 - half, 0.4 + half), abs=1e-5)
    assert f"| table1 | {db} − {base} | DINO | 2 | +0.400 | [-0.871, +1.671] |" in text
    # without the world its rows are still read, as the runs they seem to be; a row whose evaluation
    # says it is a control stays one, named by its method
    plain = write_report([sweep], tmp_path / "plain")["report"].read_text()
    assert "6 trained runs and 2 control evaluations (Base model) of 2 subjects" in plain
    control(sweep, "mirror", "s1", 0.4)
    record = sweep / "mirror-s1" / "eval" / "metrics.json"
    marked = json.loads(record.read_text())
    record.write_text(json.dumps({**marked, "metadata": {**marked["metadata"], "control": True}}))
    plain = write_report([sweep], tmp_path / "plain")["report"].read_text()
    assert "6 trained runs and 3 control evaluations (Base model, mirror) of 2 subjects" in plain
    assert "| ours | mirror (sd15; control) | 1 | 1 | 0.400 |" in plain


def test_one_subject_gets_one_line_instead_of_intervals(tmp_path):
    for name, weight in (("a", 1.0), ("b", 0.0)):
        write_run(tmp_path / "sweep", name, "teapot", 0.5 + weight / 10, weight=weight)
    control(tmp_path / "sweep", "base", "teapot", 0.1)
    written = write_report([tmp_path / "sweep"], tmp_path / "report")
    section = written["report"].read_text().split("## Paired differences\n\n")[1]
    assert section.startswith("No intervals: each pair of rows shares one subject, and a paired interval needs two")
    assert "| table" not in section
    paired = list(csv.DictReader(written["paired"].open()))
    assert paired and all(r["subjects"] == "1" and r["ci_low"] == "" for r in paired)  # the differences stay


def test_only_the_tables_the_axes_fill_are_shown(tmp_path):
    ppl = tmp_path / "ppl"
    for subject in ("s1", "s2"):
        for weight in (0.0, 1.0):
            write_run(ppl, f"{subject}-{weight}", subject, 0.5, weight=weight)
        control(ppl, "base", subject, 0.1)  # no prior weight, no class noun: not an axis value
    text = write_report([ppl], tmp_path / "r1")["report"].read_text()
    assert "## Table 1" in text and "## Table 3" in text and "## Table 4" not in text
    assert (
        "Table 4 (class noun ablation) is left out: every trained run has the same class noun in its instance"
        " prompt (its rows are in table4.csv)." in text
    )
    nouns = tmp_path / "nouns"
    for condition in ("correct", "none", "wrong"):
        write_run(nouns, condition, "s1", 0.5, condition=condition)
    written = write_report([nouns], tmp_path / "r2")
    text = written["report"].read_text()
    assert "## Table 4" in text and "## Table 3" not in text and "Correct Class − No Class" not in text
    assert "Table 3 (prior weight ablation) is left out: every trained run has the same prior weight" in text
    assert written["table3"].is_file()  # the CSV tables are all written, for the notebook and other readers


def test_a_sweep_ends_with_a_console_summary_of_every_row_and_metric(tmp_path, capsys):
    sweep = two_subject_sweep(tmp_path / "sweep")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    SweepReport(base_model=None, worlds={"hand": HandWorld()}).on_multirun_end(config)
    out = capsys.readouterr().out
    assert out.endswith(f"[report] {sweep / 'report' / 'report.md'}\n")
    lines = out.split("[report] ")[1].splitlines()
    assert lines[0] == "4 rows x 5 metrics (2 trained runs, 6 control evaluations; means over subjects):"
    width = len("DreamBooth (sd15, PPL λ=1)")
    assert lines[1] == f"{'row':<{width}}  subjects  runs    PRES     DIV    DINO  CLIP-I  CLIP-T"
    # DreamBooth: DINO (0.6 + 0.8) / 2, CLIP-I that + 0.1; every run wrote PRES 0.5, DIV 0.2, CLIP-T 0.3
    assert lines[2] == "DreamBooth (sd15, PPL λ=1)         2     2   0.500   0.200   0.700   0.800   0.300"
    assert [line[:width].rstrip() for line in lines[3:6]] == ["Base model (control)", "Oracle (control)", "Words (control)"]
    assert lines[4].split()[-3:] == ["0.925", "1.025", "0.300"]


def test_reporting_imports_no_world_module(tmp_path):
    """Reporting names no world: the toy world comes in only through the configured plug-in list."""
    sweep = two_subject_sweep(tmp_path / "sweep")
    code = f"""
import pkgutil, importlib, sys
import dreambooth_pl.reporting as reporting
for module in pkgutil.iter_modules(reporting.__path__):
    importlib.import_module(f"dreambooth_pl.reporting.{{module.name}}")
from dreambooth_pl.reporting.report import write_report
from dreambooth_pl.reporting.sweep import SweepReport
write_report([{str(sweep)!r}], {str(tmp_path / "report")!r})
SweepReport(base_model=None)
assert not [m for m in sys.modules if "toyworld" in m], [m for m in sys.modules if "toyworld" in m]
from dreambooth_pl.reporting.controls import configured_worlds
print(type(configured_worlds()[0]).__module__)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "dreambooth_pl.toyworld.controls"


def test_the_toy_world_plugs_in_its_control_rows(tmp_path):
    (world,) = configured_worlds()  # conf/report/sweep.yaml, as `python -m dreambooth_pl.report` reads it
    assert isinstance(world, ToyWorld) and world.attribute_words == "{colour}"
    photos = REPO / "toyworld" / "dataset" / "heldout_teapot"
    jobs = world.control_jobs({"real_images_dir": str(photos), "identifier": "sks"})
    assert [(j.method, j.identifier, j.producer is None) for j in jobs] == [
        ("attribute_words", "red", True),  # the base model, prompted "a red teapot in the jungle"
        ("renderer", "sks", False),
        ("renderer_lookalike", "sks", False),
    ]
    truth, lookalike = jobs[1].producer("a sks teapot in the jungle", 3), jobs[2].producer("a sks teapot in the jungle", 3)
    assert truth.size == lookalike.size and truth.tobytes() != lookalike.tobytes()
    (tmp_path / "photos").mkdir()
    assert world.control_jobs({"real_images_dir": str(tmp_path / "photos"), "identifier": "sks"}) == []
    assert {row.method for row in world.controls} == {j.method for j in jobs}


def write_validation(run: Path, curve: list[tuple[int, float, float, float]], selected: int | None) -> None:
    """The training side's files, written by hand: metrics.csv (step 0 the base model) and selected.json."""
    folder = run / "validation"
    folder.mkdir(parents=True)
    lines = ["step,dino,clip_i,clip_t"] + [f"{step},{dino},{clip_i},{clip_t}" for step, dino, clip_i, clip_t in curve]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    if selected is not None:
        step, dino, clip_i, clip_t = next(point for point in curve if point[0] == selected)
        rule = "highest dino among steps whose clip_t is within 0.02 of step 0's"
        record = {"step": step, "metrics": {"dino": dino, "clip_i": clip_i, "clip_t": clip_t}, "rule": rule}
        (folder / "selected.json").write_text(json.dumps({**record, "select": "best"}))


def test_the_report_overlays_each_runs_tradeoff_curve_and_lists_the_selected_steps(tmp_path):
    sweep = tmp_path / "sweep"
    for subject in ("s1", "s2"):
        for name, weight in (("ppl", 1.0), ("no-ppl", 0.0)):
            write_run(sweep, f"{name}-{subject}", subject, 0.5, weight=weight, seed=7)
    control(sweep, "base", "s1", 0.1)  # a control row has no validation: no curve, no error
    write_validation(sweep / "ppl-s1", [(0, 0.2, 0.5, 0.35), (100, 0.5, 0.7, 0.33), (200, 0.6, 0.75, 0.3)], 200)
    write_validation(sweep / "no-ppl-s1", [(0, 0.2, 0.5, 0.35), (100, 0.7, 0.8, 0.25)], 0)
    write_validation(sweep / "ppl-s2", [(0, 0.3, 0.5, 0.34)], None)  # validated, nothing selected
    written = write_report([sweep], tmp_path / "report")
    text = written["report"].read_text()
    assert "## Fidelity and editability during training" in text and "![trade-off](tradeoff.png)" in text
    rule = "best: highest dino among steps whose clip_t is within 0.02 of step 0's"
    assert f"Selected steps (rule {rule})." in text
    assert "| DreamBooth (sd15, no PPL) | s1 | 7 | 0 | 2 | 0.200 | 0.350 | 0.500 |" in text
    assert "| DreamBooth (sd15, PPL λ=1) | s1 | 7 | 200 | 3 | 0.600 | 0.300 | 0.750 |" in text
    assert "| s2 |" not in text

    figure = Image.open(written["tradeoff"]).convert("RGB")
    assert figure.size == (1000, 640)
    # CLIP-T across, as each run's own figure: 0.25..0.35, padded 0.01 (the least padding): 0.24..0.36 over
    # x 70..670; DINO up: 0.2..0.7, padded 8%: 0.16..0.74 over y 580..50
    def at(dino, clip_t):
        return 70 + (clip_t - 0.24) / 0.12 * 600, 580 - (dino - 0.16) / 0.58 * 530

    rows = sorted(["DreamBooth (sd15, PPL λ=1)", "DreamBooth (sd15, no PPL)"])  # colours in row order
    blue, orange = (31, 119, 180), (255, 127, 14)
    colour = dict(zip(rows, (blue, orange)))
    x, y = at(0.6, 0.3)  # the lambda-1 run's selected step: filled in its row's colour, ringed in black
    assert figure.getpixel((round(x), round(y))) == colour["DreamBooth (sd15, PPL λ=1)"]
    assert figure.getpixel((round(x + 6), round(y))) == (0, 0, 0)
    x, y = at(0.25, 0.345)  # the lambda-1 row's step 0: the mean of s1's and s2's, a square's left edge
    assert figure.getpixel((round(x - 5), round(y))) == colour["DreamBooth (sd15, PPL λ=1)"]
    x, y = at(0.7, 0.25)  # the no-PPL run's last step: a small dot in its colour, not ringed
    assert figure.getpixel((round(x), round(y))) == colour["DreamBooth (sd15, no PPL)"]
    assert figure.getpixel((round(x + 6), round(y))) == (255, 255, 255)

    # damaged files are named at the top and left out; without any validation there is no figure
    (sweep / "ppl-s2" / "validation" / "metrics.csv").write_text("step,dino\n0,not-a-number\n")
    text = write_report([sweep], tmp_path / "again")["report"].read_text()
    assert f"{sweep / 'ppl-s2' / 'validation' / 'metrics.csv'} is not a validation table" in text.split("## Table 1")[0]
    for run in ("ppl-s1", "no-ppl-s1", "ppl-s2"):
        for file in (sweep / run / "validation").iterdir():
            file.unlink()
    written = write_report([sweep], tmp_path / "none")
    assert "tradeoff" not in written and "Fidelity and editability" not in written["report"].read_text()
