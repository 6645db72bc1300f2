"""The final-sample reader on renderer images whose context, colour and subject are known."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth_pl.toyworld import read_samples
from dreambooth_pl.toyworld.read_samples import Asked, SampleReader, summary
from dreambooth_pl.toyworld.subjects import GroundTruth
from dreambooth_pl.util.images import list_images, load_rgb

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "toyworld" / "dataset" / "toy_teapot"
CONTEXT_PROMPTS = [f"a sks teapot {c}" for c in ("in the jungle", "in the snow", "on the beach", "on top of a dirt road")]
COLOUR_PROMPTS = ["a red sks teapot", "a green sks teapot"]  # colours the toy CLIP reads on this subject


def test_asked_parses_context_and_colour_words():
    assert Asked.of("a sks teapot in the snow") == Asked("in the snow", None)
    assert Asked.of("a red sks teapot") == Asked("", "red")
    # the context's own colour word is no subject colour; the longest context that ends the prompt wins
    assert Asked.of("a sks teapot with a blue house in the background") == Asked(
        "with a blue house in the background", None
    )
    assert Asked.of("a blue teapot on top of a white rug") == Asked("on top of a white rug", "blue")


@pytest.fixture(scope="module")
def reader():
    return SampleReader.of_toy_world()


def _draw(truth, prompts, per_prompt=4):
    rows = [p for p in prompts for _ in range(per_prompt)]
    return [truth(p, seed) for seed, p in enumerate(rows)], rows


def test_reads_renderer_contexts_colours_and_subject(reader):
    truth = GroundTruth.of(PHOTOS, "sks")
    real = [load_rgb(p) for p in list_images(PHOTOS)]
    images, prompts = _draw(truth, CONTEXT_PROMPTS + COLOUR_PROMPTS)
    readings = reader.read(images, prompts, real)
    s = summary(readings)
    assert s["contexts"][1] == 16 and s["colours"][1] == 8  # only what a prompt asks for is scored
    assert s["contexts"][0] >= 15  # the toy CLIP reads the renderer's contexts (probe.json: 100%)
    assert s["colours"][0] >= 6
    # the subject drawn in the renderer's contexts is the subject, its look-alike posed the same way is not
    lookalike = reader.read(_draw(truth.lookalike(), CONTEXT_PROMPTS)[0], prompts[:16], real)
    assert summary(readings[:16])["dino"] > summary(lookalike)["dino"] + 0.05
    # and a prompt that asks for red is read red far more often on red renders than on the subject's blue
    blue = reader.read(_draw(truth, ["a sks teapot"])[0], ["a red sks teapot"] * 4, real)
    assert summary(blue)["colours"][0] == 0


def test_cli_reads_a_samples_folder_and_refuses_a_wrong_one(tmp_path, capsys):
    truth = GroundTruth.of(PHOTOS, "sks")
    samples = tmp_path / "final_samples"
    samples.mkdir()
    (samples / "prompts.txt").write_text("\n".join(COLOUR_PROMPTS[:1] + CONTEXT_PROMPTS[:1]) + "\n")
    for p, prompt in enumerate(COLOUR_PROMPTS[:1] + CONTEXT_PROMPTS[:1]):
        for i in range(2):
            truth(prompt, i).save(samples / f"p{p:02d}_{i:02d}.png")
    out = tmp_path / "readings.json"
    read_samples.main([str(tmp_path), "--real", str(PHOTOS), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| a sks teapot in the jungle | in the jungle (yes)" in printed
    assert '"contexts": [\n      2,\n      2\n    ]' in out.read_text()
    with pytest.raises(SystemExit, match="dreambooth.json naming its photos"):
        read_samples.main([str(tmp_path)])  # no export to say which photos
    (samples / "p05_00.png").write_bytes((samples / "p00_00.png").read_bytes())
    with pytest.raises(SystemExit, match="p05_00.png has no prompt"):
        read_samples.main([str(tmp_path), "--real", str(PHOTOS)])
