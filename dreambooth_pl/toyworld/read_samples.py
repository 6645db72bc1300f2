"""Read a toy run's final samples back: did each image show the prompted context and colour, and the subject?

`python -m dreambooth_pl.toyworld.read_samples <run dir>` reads `<run>/final_samples` (the images `python
train.py` renders after export, named in its prompts.txt) with the toy world's own readers:
- context and colour: the toy CLIP zero-shot (`CaptionReader`: the best of every class x context x colour
  caption, the 16 DreamBench contexts the renderer draws), scored against what the prompt asked for;
- subject: the toy DINO's cosine to the subject's photos (the evaluation's DINO: its model and preprocessing,
  conf/eval/toy.yaml), averaged over the photos.
The photos are the ones the run trained on (dreambooth.json of its export) unless `--real` names others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from dreambooth_pl.evaluation.metrics import DinoEmbedder, Preprocess, SubjectFidelity
from dreambooth_pl.runs.export import EXPORT_INFO, read_export_info
from dreambooth_pl.toyworld import scenes
from dreambooth_pl.toyworld.probe import CaptionReader
from dreambooth_pl.util.images import list_images, load_rgb

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SAMPLE_NAME = re.compile(r"^p(\d+)_(\d+)\.png$")  # dreambooth_pl.generate's file names: prompt, image


@dataclasses.dataclass(frozen=True)
class Asked:
    """What a prompt asks the renderer's vocabulary for: a context ("" for none) and a colour (or None)."""

    context: str
    colour: str | None

    @classmethod
    def of(cls, prompt: str) -> Asked:
        context = max((c for c in scenes.CONTEXTS[1:] if prompt.endswith(c)), key=len, default="")
        rest = prompt[: len(prompt) - len(context)].split()  # "with a blue house ..." names no subject colour
        return cls(context, next((w for w in rest if w in scenes.COLOURS), None))


@dataclasses.dataclass(frozen=True)
class Reading:
    prompt: str
    asked: Asked
    context: str  # read by the toy CLIP
    colour: str
    dino: float  # mean cosine of the toy DINO to the subject's photos

    @property
    def context_hit(self) -> bool | None:
        return self.context == self.asked.context if self.asked.context else None

    @property
    def colour_hit(self) -> bool | None:
        return self.colour == self.asked.colour if self.asked.colour else None


class SampleReader:
    """The toy CLIP's zero-shot caption reader and the evaluation's toy DINO, loaded once."""

    def __init__(self, clip_dir: str | Path, dino_dir: str | Path, dino_preprocess: Preprocess, batch_size: int = 32):
        self.captions = CaptionReader(Path(clip_dir))
        self.dino = DinoEmbedder(str(dino_dir), dino_preprocess, batch_size, "cpu")

    @classmethod
    def of_toy_world(cls, toyworld_dir: str | Path | None = None) -> SampleReader:
        """The readers of `toyworld_dir` (default: paths.toyworld_dir), DINO as conf/eval/toy.yaml reads it."""
        overrides = ["eval=toy"] + ([f"paths.toyworld_dir={toyworld_dir}"] if toyworld_dir else [])
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("evaluate", overrides=overrides)
        dino = cfg.eval.dino
        preprocess = Preprocess(**{key: dino[key] for key in ("resize", "crop", "mean", "std")})
        return cls(Path(cfg.paths.toyworld_dir) / "clip", dino.model, preprocess, cfg.eval.embed_batch_size)

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image], prompts: Sequence[str], real: Sequence[Image.Image]) -> list[Reading]:
        """One reading per image; `prompts[i]` is what image i was asked for."""
        read = self.captions.read(images)
        fidelity = SubjectFidelity(self.dino.images(real))
        fidelity.update(self.dino.images(images))
        dino = fidelity.per_item().tolist()
        return [
            Reading(prompt, Asked.of(prompt), context, colour, score)
            for prompt, (_, context, colour), score in zip(prompts, read, dino)
        ]


def summary(readings: Sequence[Reading]) -> dict:
    """Contexts and colours read as asked (hits of those asked), and the mean DINO."""

    def hits(values: list[bool | None]) -> list[int]:
        asked = [v for v in values if v is not None]
        return [sum(asked), len(asked)]

    return {
        "contexts": hits([r.context_hit for r in readings]),
        "colours": hits([r.colour_hit for r in readings]),
        "dino": sum(r.dino for r in readings) / len(readings),
    }


def load_samples(folder: Path) -> tuple[list[Image.Image], list[str]]:
    """The images of a `generate` folder and the prompt each was rendered from (its prompts.txt)."""
    prompts_file = folder / "prompts.txt"
    if not prompts_file.is_file():
        raise FileNotFoundError(f"{prompts_file} not found: not a folder of final samples")
    prompts = prompts_file.read_text().splitlines()
    files = [(m, p) for p in sorted(folder.iterdir()) if (m := SAMPLE_NAME.match(p.name))]
    if not files:
        raise FileNotFoundError(f"no p<prompt>_<image>.png samples in {folder}")
    for match, path in files:
        if int(match.group(1)) >= len(prompts):
            raise ValueError(f"{path} has no prompt in {prompts_file} ({len(prompts)} lines)")
    return [load_rgb(p) for _, p in files], [prompts[int(m.group(1))] for m, _ in files]


def photos_of_run(run_dir: Path) -> str:
    """The photos the run trained on, as its export's dreambooth.json records them."""
    for info_file in sorted(run_dir.glob(f"*/{EXPORT_INFO}")):
        info = read_export_info(info_file.parent)
        if info.get("instance_dir"):
            return info["instance_dir"]
    raise FileNotFoundError(f"no exported model with a {EXPORT_INFO} naming its photos in {run_dir}: pass --real")


def table(readings: Sequence[Reading]) -> str:
    lines = ["| prompt | context read | colour read | DINO |", "| --- | --- | --- | ---: |"]
    mark = {True: " (yes)", False: " (no)", None: ""}
    for r in readings:
        lines.append(
            f"| {r.prompt} | {r.context}{mark[r.context_hit]} | {r.colour}{mark[r.colour_hit]} | {r.dino:.3f} |"
        )
    s = summary(readings)
    lines.append(
        f"\ncontexts read as asked: {s['contexts'][0]} of {s['contexts'][1]}; colours read as asked: "
        f"{s['colours'][0]} of {s['colours'][1]}; DINO to the subject's photos: {s['dino']:.3f}"
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_pl.toyworld.read_samples", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a toy training run folder (or a folder of samples with --real)")
    parser.add_argument("--samples", type=Path, help="the samples folder (default: <run_dir>/final_samples)")
    parser.add_argument("--real", help="the subject's photos (default: the ones the run trained on)")
    parser.add_argument("--toyworld", help="the toy world folder (default: paths.toyworld_dir)")
    parser.add_argument("--json", type=Path, help="also write the readings and summary there")
    args = parser.parse_args(argv)
    try:
        images, prompts = load_samples(args.samples or args.run_dir / "final_samples")
        real = [load_rgb(p) for p in list_images(args.real or photos_of_run(args.run_dir), option="--real")]
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    readings = SampleReader.of_toy_world(args.toyworld).read(images, prompts, real)
    print(table(readings), end="")
    if args.json:
        rows = [{**dataclasses.asdict(r), "context_hit": r.context_hit, "colour_hit": r.colour_hit} for r in readings]
        args.json.write_text(json.dumps({"summary": summary(readings), "readings": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
