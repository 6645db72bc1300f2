"""Report tables by hand on synthetic runs, then the real command and the notebook on a tiny evaluated sweep."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth_pl.evaluation.record import model_location
from dreambooth_pl.reporting.controls import control_rows
from dreambooth_pl.reporting.records import read_report_row
from dreambooth_pl.reporting.report import main, write_report
from dreambooth_pl.reporting.statistics import paired_comparisons, t_quantile
from dreambooth_pl.reporting.tables import build_tables
from dreambooth_pl.toyworld.controls import ToyWorld
from tests.conftest import REPO, needs_dataset
from tests.test_evaluate import evaluated_sweep

BASE_ONLY = control_rows([])  # the report's own control row, no world's


def write_run(root: Path, name: str, subject: str, dino: float, weight=1.0, condition="correct", **meta) -> Path:
    nouns = {"correct": "teapot", "none": "", "wrong": "dog"}
    record = {
        "metrics": {
            "dino": dino,
            "clip_i": dino + 0.1,
            "clip_t": 0.3,
            "pres": 0.5,
            "div": 0.2,
            "real_dino": 0.8,
            "real_clip_i": 0.9,
        },  # fmt: skip
        "div_backend": "dino",
        "metadata": {
            "subject": subject,
            "method": "dreambooth",
            "model": "sd15",
            "prior_enabled": True,
            "prior_weight": weight,
            "class_noun": "teapot",
            "instance_class_noun": nouns[condition],
            "class_noun_condition": condition,
            "identifier": "sks",
            "tags": ["t"],
            **meta,
        },
        "grids": {"grid": "grid.png"},
    }
    path = root / name / "eval" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def runs(tmp_path) -> Path:
    write_run(tmp_path, "a1", "teapot", 0.6)
    write_run(tmp_path, "a2", "teapot", 0.8)  # a second seed of the same subject: averaged first
    write_run(tmp_path, "b", "dog", 0.5)
    write_run(tmp_path, "c", "dog", 0.4, weight=0.0)
    write_run(tmp_path, "d", "teapot", 0.2, condition="none")
    write_run(tmp_path, "e", "teapot", 0.3, condition="wrong")
    write_run(tmp_path, "f", "teapot", 0.45, method="lora")
    write_run(tmp_path, "g", "teapot", 0.1, prior_enabled=False, prior_weight=1.0, method=None)
    (tmp_path / "unrelated" / "metrics.json").parent.mkdir()
    (tmp_path / "unrelated" / "metrics.json").write_text("{}")  # not under eval/: ignored
    return tmp_path


def rows_by_label(rows: list[dict]) -> dict[str, dict]:
    return {(r["source"], r["row"]): r for r in rows}


def test_tables_average_per_subject_then_over_subjects(runs):
    tables = build_tables([read_report_row(p) for p in sorted(runs.rglob("eval/metrics.json"))], BASE_ONLY)
    t1 = rows_by_label(tables["table1"])
    ours = t1[("ours", "DreamBooth (sd15, PPL λ=1)")]
    # teapot: (0.6 + 0.8) / 2 = 0.7, dog: 0.5 -> mean 0.6, standard error stdev(0.7, 0.5) / sqrt 2 = 0.1
    assert (ours["subjects"], ours["runs"]) == (2, 3)
    assert ours["dino_mean"] == pytest.approx(0.6) and ours["dino_se"] == pytest.approx(0.1)
    assert ours["clip_i_mean"] == pytest.approx(0.7) and ours["clip_t_se"] == pytest.approx(0.0)
    assert t1[("ours", "DreamBooth (sd15, no PPL)")]["dino_mean"] == pytest.approx(0.25)  # 0.4 and disabled 0.1
    assert t1[("ours", "DreamBooth (sd15, no PPL)")]["subjects"] == 2
    lora = t1[("ours", "LoRA DreamBooth (sd15, PPL λ=1)")]
    assert lora["dino_mean"] == pytest.approx(0.45) and lora["dino_se"] is None  # one subject: no error bar
    real = t1[("ours", "Real Images")]
    assert real["dino_mean"] == pytest.approx(0.8) and real["clip_t_mean"] is None and real["subjects"] == 2
    assert t1[("paper", "DreamBooth (Stable Diffusion)")]["dino_mean"] == 0.668
    assert t1[("paper", "Textual Inversion (Stable Diffusion)")]["clip_t_mean"] == 0.255
    assert t1[("paper", "Real Images")]["clip_i_mean"] == 0.885
    assert all("Class" not in label for _, label in t1)  # the class-noun ablation runs stay out of Table 1

    t3 = rows_by_label(tables["table3"])
    assert [r["row"] for r in tables["table3"] if r["source"] == "ours"] == [
        "DreamBooth (sd15, no PPL)",
        "DreamBooth (sd15, PPL λ=1)",
        "LoRA DreamBooth (sd15, PPL λ=1)",
    ]
    assert t3[("ours", "DreamBooth (sd15, PPL λ=1)")]["pres_mean"] == pytest.approx(0.5)
    assert t3[("paper", "DreamBooth (Imagen) w/ PPL")]["pres_mean"] == 0.493
    assert t3[("paper", "DreamBooth (Imagen) w/o PPL")]["div_mean"] == 0.371

    t4 = [r for r in tables["table4"] if r["source"] == "ours" and r["method"] == "dreambooth" and r["prior_weight"]]
    assert [r["class_noun_condition"] for r in t4] == ["correct", "none", "wrong"]
    assert [r["dino_mean"] for r in t4] == pytest.approx([0.6, 0.2, 0.3])
    paper4 = {r["class_noun_condition"]: r for r in tables["table4"] if r["source"] == "paper"}
    assert (paper4["none"]["dino_mean"], paper4["wrong"]["clip_i_mean"]) == (0.303, 0.728)

    write_run(runs, "h", "teapot", 0.05, prior_weight=None, method="base")  # a control: prompted, never trained
    t4 = build_tables([read_report_row(p) for p in sorted(runs.rglob("eval/metrics.json"))], BASE_ONLY)["table4"]
    labels = [r["row"] for r in t4 if r["source"] == "ours"]
    assert "Base model (sd15, no fine-tuning; control)" in labels and "DreamBooth (sd15, PPL λ=1): No Class" in labels


def test_unknown_prior_is_not_taken_for_no_prior(tmp_path):
    write_run(tmp_path, "x", "teapot", 0.5, prior_enabled=None, prior_weight=None)
    (row,) = [
        r for r in build_tables([read_report_row(tmp_path / "x" / "eval" / "metrics.json")], BASE_ONLY)["table1"] if r.get("method")
    ]
    assert row["row"] == "DreamBooth (sd15, prior unknown)"


def test_report_files(runs, capsys):
    main([str(runs)])
    out = runs / "report"
    markdown = (out / "report.md").read_text()
    assert "| ours | DreamBooth (sd15, PPL λ=1) | 2 | 3 | 0.600 ± 0.100 | 0.700 ± 0.100 | 0.300 ± 0.000 |" in markdown
    assert "| *paper* | DreamBooth (Imagen) w/o PPL | 30 |  | 0.664 | 0.371 | 0.712 | 0.828 | 0.306 |" in markdown
    assert "| ours | Real Images | 2 | 8 | 0.800 ± 0.000 | 0.900 ± 0.000 | N/A |" in markdown
    assert "DIV backend: dino (1 - cosine of DINO features" in markdown
    assert "| PRES | DIV (dino: NOT LPIPS, compare directions only) | DINO |" in markdown  # beside the paper's LPIPS
    assert markdown in capsys.readouterr().out
    table1 = list(csv.DictReader((out / "table1.csv").open()))
    assert table1[0]["row"] == "Real Images" and {r["source"] for r in table1} == {"ours", "paper"}
    assert float(next(r for r in table1 if r["row"] == "DreamBooth (sd15, PPL λ=1)")["dino_se"]) == pytest.approx(0.1)
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 8
    # run folders and files can be listed one by one too
    written = write_report([runs / "a1", runs / "b" / "eval" / "metrics.json"], runs / "two")
    assert len(list(csv.DictReader(written["runs"].open()))) == 2


def test_t_quantiles_match_the_printed_tables():
    for df, printed in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)]:
        assert t_quantile(0.975, df) == pytest.approx(printed, abs=5e-4)


def test_rows_are_compared_by_paired_differences_per_subject(tmp_path):
    dino = {  # (DreamBooth lambda 1, lambda 0, base) per subject; s1 has two DreamBooth seeds, averaged first
        "s1": ([0.6, 0.8], 0.5, 0.1),
        "s2": ([0.5], 0.3, 0.2),
        "s3": ([0.9], 0.6, 0.0),
    }
    for subject, (with_ppl, without, base) in dino.items():
        for seed, value in enumerate(with_ppl):
            write_run(tmp_path, f"{subject}-ppl-{seed}", subject, value, seed=seed)
        write_run(tmp_path, f"{subject}-no-ppl", subject, without, weight=0.0)
        write_run(tmp_path, f"{subject}-base", subject, base, method="base", prior_weight=None, prior_enabled=None)
    write_run(tmp_path, "s1-none", "s1", 0.2, condition="none")  # one subject: a difference, no interval
    rows = paired_comparisons([read_report_row(p) for p in sorted(tmp_path.rglob("eval/metrics.json"))], BASE_ONLY)
    found = {(r["table"], r["comparison"], r["metric"]): r for r in rows}

    # lambda 1 - lambda 0 per subject: 0.7 - 0.5, 0.5 - 0.3, 0.9 - 0.6 = 0.2, 0.2, 0.3
    # mean 0.7/3, sd sqrt(((0.1/3)^2 * 2 + (0.2/3)^2) / 2) = 0.0577350, se 0.0333333, t(0.975, 2) = 4.302653
    ppl = found[("table3", "DreamBooth (sd15, PPL λ=1) − DreamBooth (sd15, no PPL)", "dino")]
    half = 4.302653 * 0.0577350 / math.sqrt(3)
    assert ppl["subjects"] == 3 and ppl["mean"] == pytest.approx(0.7 / 3)
    assert (ppl["ci_low"], ppl["ci_high"]) == pytest.approx((0.7 / 3 - half, 0.7 / 3 + half), abs=1e-5)
    assert ppl["excludes_0"] is True  # [0.090, 0.377]
    assert found[("table3", "DreamBooth (sd15, PPL λ=1) − DreamBooth (sd15, no PPL)", "clip_t")]["mean"] == 0

    # DreamBooth - base: 0.6, 0.3, 0.9; mean 0.6, sd 0.3 -> half-width 4.302653 * 0.3 / sqrt 3 = 0.7452
    base = found[("table1", "DreamBooth (sd15, PPL λ=1) − Base model (sd15, no fine-tuning; control)", "dino")]
    expected = (0.6, 0.6 - 0.74524, 0.6 + 0.74524)
    assert (base["mean"], base["ci_low"], base["ci_high"]) == pytest.approx(expected, abs=1e-4)
    assert base["excludes_0"] is False
    assert ("table1", "Base model (sd15, no fine-tuning; control) − DreamBooth (sd15, PPL λ=1)", "dino") not in found

    none = found[("table4", "DreamBooth (sd15, PPL λ=1): Correct Class − No Class", "dino")]
    assert (none["subjects"], none["mean"], none["ci_low"], none["excludes_0"]) == (1, pytest.approx(0.5), None, None)

    written = write_report([tmp_path], tmp_path / "report")
    text = written["report"].read_text()
    ppl_row = "| table3 | DreamBooth (sd15, PPL λ=1) − DreamBooth (sd15, no PPL) | DINO | 3 | **+0.233** |"
    assert ppl_row + " [+0.090, +0.377] |" in text
    assert "Correct Class − No Class" not in text  # one subject: no interval, so only in paired.csv
    assert "2 comparisons with only one shared subject have no interval (paired.csv)." in text  # DINO and CLIP-I
    assert len(list(csv.DictReader(written["paired"].open()))) == len(rows)


def test_the_toy_worlds_readers_table_explains_each_reader_and_marks_its_columns(tmp_path):
    """A readers table beside the runs' DINO model (the toy world's readers stage): one sentence per reader
    with its figures, and the columns of a reader that failed a test marked; DIV by the runs' backend only."""
    world = tmp_path / "world"
    dino, clip = "DINO stand-in (DINO, PRES)", "toy CLIP (CLIP-I)"
    rows = [
        {"reader": dino, "columns": ["dino", "pres"], "case": "other pattern", "win_rate": 0.83, "passes": False},
        {"reader": dino, "columns": ["dino", "pres"], "case": "other all three", "win_rate": 0.99, "passes": True},
        {"reader": clip, "columns": ["clip_i"], "case": "other pattern", "win_rate": 0.96, "passes": True},
        {"reader": "1 - cosine", "columns": ["div"], "case": "varied", "win_rate": 0.85, "passes": False, "div_backend": "dino"},
        {"reader": "VAE", "columns": ["div"], "case": "varied", "win_rate": 1.0, "passes": True, "div_backend": "vae"},
    ]  # fmt: skip
    (world / "readers").mkdir(parents=True)
    (world / "readers" / "readers.json").write_text(json.dumps({"pairs": 200, "rows": rows}))
    for name, weight in (("a", 1.0), ("b", 0.0)):  # an ablation of the prior: Table 3 shows PRES and DIV
        write_run(tmp_path / "runs", name, "teapot", 0.5, weight=weight, dino_model=str(world / "dino"))
    text = write_report([tmp_path / "runs"], tmp_path / "report", [ToyWorld()])["report"].read_text()
    div = "DIV (dino: NOT LPIPS, compare directions only) (reader NOT validated)"
    assert f"| PRES (reader partly validated) | {div} | DINO (reader partly validated) |" in text
    assert "| CLIP-I |" in text and "NOT VALIDATED" not in text
    readers = text.split("## Readers\n\n")[1].split("\n\n")[0].splitlines()
    table = world / "readers" / "readers.md"
    assert readers == [
        f"- {dino} is partly validated: it passes 1 of its 2 tests of 200 pairs, other all three (99% of pairs"
        f" right), and fails other pattern (83%) (thresholds: {table}).",
        f"- {clip} is validated: it passes 1 of its 1 tests of 200 pairs, other pattern (96% of pairs right)"
        f" (thresholds: {table}).",
        f"- 1 - cosine is NOT validated: it passes 0 of its 1 tests of 200 pairs and fails varied (85% of pairs"
        f" right) (thresholds: {table}).",
    ]
    assert "## Readers" not in write_report([tmp_path / "runs"], tmp_path / "plain")["report"].read_text()


def test_a_relative_dino_folder_is_recorded_so_the_report_finds_its_readers_from_anywhere(tmp_path, monkeypatch):
    """`eval.dino.model=world/dino` given from one folder; the report run from another still marks DINO."""
    world = tmp_path / "world"
    (world / "dino").mkdir(parents=True)
    (world / "readers").mkdir()
    (world / "readers" / "readers.json").write_text(json.dumps({"rows": [{"columns": ["dino"], "passes": False}]}))
    monkeypatch.chdir(tmp_path)
    recorded = model_location("world/dino")
    assert (
        recorded == str((world / "dino").resolve()) and model_location("facebook/dino-vits16") == "facebook/dino-vits16"
    )
    write_run(tmp_path / "runs", "a", "teapot", 0.5, dino_model=recorded)
    monkeypatch.chdir(tmp_path / "runs")
    text = write_report([tmp_path / "runs"], tmp_path / "report", [ToyWorld()])["report"].read_text()
    assert "| DINO (reader NOT validated) |" in text


def test_nothing_to_report_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="No eval/metrics.json under"):
        main([str(tmp_path)])


# --------------------------------------------------------------------------- a real tiny sweep


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, cache_dir) -> Path:
    return evaluated_sweep(tmp_path_factory.getbasetemp(), cache_dir)


@needs_dataset
def test_report_on_a_tiny_sweep(sweep):
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_pl.report", str(sweep)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ours | DreamBooth (tiny, no PPL) | 1 | 1 |" in proc.stdout
    table3 = list(csv.DictReader((sweep / "report" / "table3.csv").open()))
    ours = {float(r["prior_weight"]): r for r in table3 if r["source"] == "ours"}
    assert set(ours) == {0.0, 1.0} and len(table3) == 4
    assert ours[0.0]["div_mean"] and not ours[1.0]["div_mean"]  # 1 image per prompt in run 1: no DIV
    for row in ours.values():
        assert math.isfinite(float(row["dino_mean"])) and row["subjects"] == "1"
    table4 = list(csv.DictReader((sweep / "report" / "table4.csv").open()))
    assert [r["class_noun_condition"] for r in table4] == ["correct", "correct", "correct", "none", "wrong"]
    runs = list(csv.DictReader((sweep / "report" / "runs.csv").open()))
    assert sorted(Path(r["run"]).name for r in runs) == ["0", "1"] and all(Path(r["grid"]).is_file() for r in runs)
    assert not math.isnan(float(runs[0]["real_dino"]))


@pytest.mark.slow
@needs_dataset
def test_notebook_runs_top_to_bottom_on_a_tiny_sweep(sweep, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    copy = tmp_path / "sweep"
    for run in ("0", "1"):  # without report/: the notebook writes it
        (copy / run / "eval").mkdir(parents=True)
        for item in (sweep / run / "eval").iterdir():
            if item.is_file():
                (copy / run / "eval" / item.name).write_bytes(item.read_bytes())
    record = json.loads((copy / "0" / "eval" / "metrics.json").read_text())
    assert record["grids"]["grid"] == "grid.png"
    monkeypatch.setenv("DREAMBOOTH_SWEEP_DIR", str(copy))
    notebook = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    )
    client.execute()
    figures = copy / "report" / "figures"
    assert sorted(p.name for p in figures.glob("*.png")) == [
        "class_noun_ablation.png",
        "dino_vs_clip_t.png",
        "grids.png",
        "ppl_ablation.png",
        "table1.png",
    ]
    shown = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) == 5  # every figure is also displayed inline


@pytest.mark.slow
@needs_dataset
def test_readme_notebook_command_with_a_relative_sweep(sweep, tmp_path):
    """`DREAMBOOTH_SWEEP_DIR=$SWEEP jupyter execute notebooks/analysis.ipynb` from the repository root, as the
    README says, with $SWEEP relative to it; on a sweep without evaluations it shows the report's own message."""
    jupyter = shutil.which("jupyter")
    if jupyter is None:
        pytest.skip('jupyter not installed: pip install -e ".[notebook]"')
    copy = tmp_path / "sweep"
    for run in ("0", "1"):
        shutil.copytree(sweep / run / "eval", copy / run / "eval", ignore=shutil.ignore_patterns("images"))
    command = [jupyter, "execute", "notebooks/analysis.ipynb"]
    env = {**os.environ, "DREAMBOOTH_SWEEP_DIR": os.path.relpath(copy, REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((copy / "report" / "figures").glob("*.png"))) == 5

    (tmp_path / "unevaluated" / "0").mkdir(parents=True)
    env["DREAMBOOTH_SWEEP_DIR"] = os.path.relpath(tmp_path / "unevaluated", REPO)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "evaluate the runs first" in proc.stderr
    assert "CalledProcessError" not in proc.stderr
