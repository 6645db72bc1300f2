"""Control rows and reader caveats: what a world (the toy world, or a real-photo setup) plugs into reports.

A report knows one control of its own, the base model. A world adds its rows (`ControlRow`: how a row is
labelled and compared), the evaluations that fill them on a swept subject (`ControlJob`), and what is known
about its readers (`ReaderNote`). Worlds are listed as `_target_`s under `worlds:` in conf/report/sweep.yaml;
the sweep callback gets them from Hydra and `python -m dreambooth_pl.report` instantiates the same list, so
reporting itself never imports a world.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from hydra.utils import instantiate
from omegaconf import OmegaConf

from dreambooth_pl.reporting.records import BASE
from dreambooth_pl.util.config import PROJECT_ROOT

if TYPE_CHECKING:  # evaluation (diffusers) loads only where a control is evaluated
    from dreambooth_pl.evaluation.render import ImageProducer

REPORT_CONFIG = PROJECT_ROOT / "conf" / "report" / "sweep.yaml"


@dataclass(frozen=True)
class ControlRow:
    """A row nothing was trained for. A `ceiling` is what the methods should not beat (compared as
    ceiling - method); any other control is a baseline the methods should beat (method - baseline)."""

    method: str  # the `method` its evaluations record
    name: str  # e.g. "Renderer ground truth"
    note: str  # what it is, in the label's parentheses; "{model}" is filled with the model's name
    ceiling: bool = False

    def label(self, model: str, short: bool = False) -> str:
        return f"{self.name} (control)" if short else f"{self.name} ({self.note.format(model=model)}; control)"


BASE_ROW = ControlRow(BASE, "Base model", "{model}, no fine-tuning")


@dataclass(frozen=True)
class ControlJob:
    """One control evaluation of a subject: the base model prompted with `identifier` (`producer` None), or
    the images of the world's `producer` (evaluation.render.ImageProducer) instead of a model."""

    method: str
    identifier: str
    producer: ImageProducer | None = None


@dataclass(frozen=True)
class ReaderNote:
    """What a reader's validation found, for the metric columns it scores."""

    columns: tuple[str, ...]
    status: str  # "validated", "partly validated" or "NOT validated"
    sentence: str  # one plain sentence with its figures


class World(Protocol):
    """A reporting plug-in (see the module docstring)."""

    controls: tuple[ControlRow, ...]

    def control_jobs(self, run: dict) -> list[ControlJob]:
        """The control evaluations for `run`'s subject (a trained run of it: photos, identifier, class)."""

    def reader_notes(self, runs: list[dict]) -> list[ReaderNote]:
        """What is known about the readers that scored `runs`; empty when this world did not score them."""


def configured_worlds() -> list[World]:
    """The worlds conf/report/sweep.yaml lists, for a report made outside a sweep."""
    worlds = OmegaConf.load(REPORT_CONFIG).get("worlds") or {}
    return list(instantiate(worlds).values())


def control_rows(worlds: Iterable[World], runs: Iterable[dict] = ()) -> dict[str, ControlRow]:
    """Every known control row by method, the base model's first; a row the runs' evaluations mark as a
    control but no world names (its world not configured here) is labelled by its method."""
    rows = {row.method: row for row in (BASE_ROW, *(row for world in worlds for row in world.controls))}
    unnamed = dict.fromkeys(r["method"] for r in runs if r["control"] and r["method"] not in rows)
    return rows | {method: ControlRow(method, method, "{model}") for method in unnamed}


def mark_controls(runs: list[dict], rows: dict[str, ControlRow]) -> list[dict]:
    """The runs, those of a known control row marked as controls (evaluations older than the mark)."""
    return [{**run, "control": run["control"] or run["method"] in rows} for run in runs]
