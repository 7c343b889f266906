"""Captioned data (issue 32): the generated captioned shapes state attributes their pixels show, splits hold what they
say, and metadata.jsonl folders are read whole or refused with one clear error naming the file and the line."""

import json

import numpy as np
import pytest
import torch

from dataward.captions import (BACKGROUNDS, COLOURS, NOVELTIES, PUBLIC_COLOURS, PUBLIC_SHAPES, SPLITS, ShapeCaption, captioned_shapes,
                               write_captioned_folder)
from dataward.data import load_source
from dataward.errors import DatawardError
from dataward.ward import Ward


def _shown(image: torch.Tensor, caption: ShapeCaption) -> dict[str, float]:
    """What the pixels show: the ink's mean colour, the centroid (x, y) of the pixels unlike the background and their
    largest distance from it (about the radius, for every shape)."""
    pixels = ((image.permute(1, 2, 0) + 1) * 127.5).numpy()  # (H, W, 3) in 0..255
    mask = np.abs(pixels - np.array(BACKGROUNDS[caption.background])).sum(axis=2) > 120
    ys, xs = np.nonzero(mask)
    side = image.shape[-1]
    x, y = (xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side
    reach = np.sqrt(((xs + 0.5) / side - x) ** 2 + ((ys + 0.5) / side - y) ** 2).max()
    return {"colour": pixels[mask].mean(axis=0), "x": x, "y": y, "reach": reach}


def test_captions_state_what_the_images_show():
    drawn = [captioned_shapes(split, 40 if split == "public" else 15, seed=3) for split in SPLITS]  # every shape and colour
    images, captions = torch.cat([d[1] for d in drawn]), sum((d[2] for d in drawn), ())
    for image, text in zip(images, captions):
        caption = ShapeCaption.parse(text)
        shown = _shown(image, caption)
        nearest = min(COLOURS, key=lambda name: np.abs(shown["colour"] - COLOURS[name]).sum())
        assert nearest == caption.colour, text
        x, y = shown["x"], shown["y"]
        where = {"on the left": x < 0.4, "on the right": x > 0.6, "at the top": y < 0.4, "at the bottom": y > 0.6,
                 "in the centre": 0.4 < x < 0.6 and 0.4 < y < 0.6}
        assert where[caption.position], (text, x, y)
        assert (shown["reach"] > 0.18) == (caption.size == "large"), (text, shown["reach"])


def test_public_split_lacks_what_each_private_split_holds():
    _, _, public = captioned_shapes("public", 200, seed=0)
    parsed = [ShapeCaption.parse(text) for text in public]
    assert {c.shape for c in parsed} == set(PUBLIC_SHAPES) and {c.colour for c in parsed} == set(PUBLIC_COLOURS)
    for k, (kind, value) in enumerate(NOVELTIES):
        private = [ShapeCaption.parse(text) for text in captioned_shapes(f"private{k}", 20, seed=0)[2]]
        assert all(getattr(c, kind) == value for c in private)
        assert all(getattr(c, kind) != value for c in parsed)


def test_captioned_shapes_source_is_stable_and_carries_captions():
    data = load_source("captioned-shapes:split=private1,count=6,seed=4,size=16")
    again = load_source("captioned-shapes:split=private1,count=6,seed=4,size=16")
    assert data.ids[0] == "captioned-shapes:private1:4:000000" and data.labels is None
    assert data.shape == (3, 16, 16) and torch.equal(data.images, again.images) and data.captions == again.captions
    picked = data.select([data.ids[3], data.ids[1]])
    assert picked.captions == (data.captions[3], data.captions[1])
    assert data.resized(8, 3).captions == data.captions
    with pytest.raises(DatawardError, match="unknown captioned shapes split 'private9'"):
        load_source("captioned-shapes:split=private9")


def test_a_metadata_folder_reads_captions_with_file_names_as_ids(tmp_path):
    folder = write_captioned_folder(tmp_path / "data", "public", count=5, seed=2, size=16)
    _, images, captions = captioned_shapes("public", 5, seed=2, size=16)
    data = load_source(f"folder:{folder}")
    assert data.ids == tuple(f"{i:05d}.png" for i in range(5)) and data.captions == captions and data.labels is None
    assert (data.images - images).abs().max() <= 1 / 127.5 + 1e-6  # PNG holds 8-bit pixels


def _rewrite(folder, edit):
    path = folder / "metadata.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


BROKEN = {
    "missing file": (lambda lines: lines[:2] + [json.dumps({"file_name": "gone.png", "text": "a cat"})] + lines[2:],
                     r"metadata.jsonl line 3: file 'gone.png' does not exist"),
    "bad line": (lambda lines: lines[:1] + ['{"file_name": "00001.png", "text": '] + lines[2:], r"metadata.jsonl line 2 is not valid JSON"),
    "empty caption": (lambda lines: lines[:3] + [json.dumps({"file_name": "00003.png", "text": "  "})] + lines[4:],
                      r"metadata.jsonl line 4: the caption \(\"text\"\) of '00003.png' is empty"),
    "duplicate name": (lambda lines: lines + [lines[1]], r"metadata.jsonl line 6: file_name '00001.png' is listed twice \(first on line 2\)"),
    "unlisted image": (lambda lines: lines[:4], r"does not list 1 image\(s\) .* \(e.g. '00004.png'\)"),
    "outside the folder": (lambda lines: lines + [json.dumps({"file_name": "../x.png", "text": "a"})], r"line 6: file_name '../x.png' must be a path inside"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_metadata_folder_is_one_clear_error_and_nothing_is_written(tmp_path, case):
    edit, message = BROKEN[case]
    folder = write_captioned_folder(tmp_path / "data", "public", count=5, seed=2, size=16)
    _rewrite(folder, edit)
    with pytest.raises(DatawardError, match=message):
        Ward.create(tmp_path / "ward", f"folder:{folder}", compartments=2)
    assert not (tmp_path / "ward").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ward")]
