"""The toy world's plug-in for reports (conf/report/sweep.yaml): its control rows, evaluated on each toy
subject a sweep trained, and what its readers stage found about the readers that scored the runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dreambooth_pl.reporting.controls import ControlJob, ControlRow, ReaderNote
from dreambooth_pl.toyworld.subjects import GroundTruth

# the base model prompted with the subject's attributes instead of the identifier (the baseline personalization
# must beat), the renderer's own drawing of the subject in each prompt's context (the ceiling), and its drawing
# of a look-alike (same class and main colour, another pattern, second colour and proportions) in the same places
ATTRIBUTE_WORDS, RENDERER, LOOKALIKE = "attribute_words", "renderer", "renderer_lookalike"
READERS_FILE = Path("readers") / "readers.json"  # the readers stage's table, beside the world's dino/ folder


class ToyWorld:
    """Control rows for toy subjects (subjects.json beside their photos); `attribute_words` fills the
    attribute-words prompt from the subject's description, e.g. "{colour}": "a blue teapot in the jungle"."""

    controls = (
        ControlRow(ATTRIBUTE_WORDS, "Base model + attribute words", "{model}, no fine-tuning"),
        ControlRow(RENDERER, "Renderer ground truth", "the subject in each prompt's context", ceiling=True),
        ControlRow(LOOKALIKE, "Renderer look-alike", "another object of the class and colour, drawn as the subject"),
    )

    def __init__(self, attribute_words: str | None = None) -> None:
        self.attribute_words = attribute_words

    def control_jobs(self, run: dict) -> list[ControlJob]:
        truth = GroundTruth.of(run["real_images_dir"], run["identifier"])
        if truth is None:
            return []
        jobs = []
        if self.attribute_words:
            words = self.attribute_words.format(**dataclasses.asdict(truth.instance))
            jobs.append(ControlJob(ATTRIBUTE_WORDS, words))
        jobs.append(ControlJob(RENDERER, run["identifier"], truth))
        jobs.append(ControlJob(LOOKALIKE, run["identifier"], truth.lookalike()))
        return jobs

    def reader_notes(self, runs: list[dict]) -> list[ReaderNote]:
        """A sentence per reader of each readers table beside the runs' DINO model (DIV's rows: the runs'
        DIV backends only)."""
        tables: dict[Path, set] = {}
        for run in runs:
            if run.get("dino_model"):
                table = Path(run["dino_model"]).parent / READERS_FILE
                if table.is_file():
                    tables.setdefault(table, set()).add(run["div_backend"])
        return [note for table, backends in tables.items() for note in _notes(table, backends)]


def _notes(table: Path, backends: set) -> list[ReaderNote]:
    try:
        found = json.loads(table.read_text())
        rows = [r for r in found["rows"] if r.get("div_backend", next(iter(backends))) in backends]
        readers: dict[str, list[dict]] = {}
        for row in rows:
            readers.setdefault(row.get("reader") or ", ".join(row["columns"]), []).append(row)
        return [_note(reader, tests, found.get("pairs"), table) for reader, tests in readers.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [ReaderNote((), "NOT validated", f"{table} cannot be read ({type(err).__name__}: {err}).")]


def _note(reader: str, tests: list[dict], pairs: int | None, table: Path) -> ReaderNote:
    """One plain sentence: which tests the reader passes and fails, each with the share of pairs it got right."""

    def cases(rows: list[dict], unit: str) -> str:
        named = enumerate((r.get("case") or r.get("test") or "a test", r.get("win_rate")) for r in rows)
        shown = [name if rate is None else f"{name} ({rate:.0%}{unit if k == 0 else ''})" for k, (name, rate) in named]
        return ", ".join(shown)

    passed, failed = [r for r in tests if r["passes"]], [r for r in tests if not r["passes"]]
    status = "validated" if not failed else "partly validated" if passed else "NOT validated"
    columns = tuple(dict.fromkeys(c for r in tests for c in r["columns"]))
    sentence = f"{reader} is {status}: it passes {len(passed)} of its {len(tests)} tests"
    sentence += f" of {pairs} pairs" if pairs else ""
    unit = " of pairs right"
    if passed:
        sentence += f", {cases(passed, unit)}"
        unit = ""
    if failed:
        sentence += f"{',' if passed else ''} and fails {cases(failed, unit)}"
    return ReaderNote(columns, status, f"{sentence} (thresholds: {table.with_suffix('.md')}).")
