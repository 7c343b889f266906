"""Issue 36 item 13: pictures that show what the features do (class rows, a forgotten image beside its nearest samples
before and after the forget, what a guard changed). The assertions read the pictures' pixels."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from dataward.data import Dataset
from dataward.pictures import DIFFERENCE_GAIN, NEAREST, ForgetPicture, guard_rows
from dataward.plots import CAPTION_LINE, NOTE, PALETTE, STRIP, draw_rows, image_grid, pixels


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def bright(region: np.ndarray) -> bool:
    """Whether text (light pixels on the dark background) was drawn in ``region``."""
    return bool((region.max(axis=-1) > 150).any())


def has_block(picture: np.ndarray, image: torch.Tensor, scale: int = 8) -> bool:
    """Whether ``image`` (C, H, W) in [0, 1], upscaled by ``scale``, appears pixel for pixel somewhere in ``picture``."""
    block = pixels(image[None], scale)[0].astype(int)
    small = block[::scale, ::scale]  # (H, W, 3)
    h, w = small.shape[:2]
    for oy in range(scale):
        for ox in range(scale):
            grid = picture[oy::scale, ox::scale]
            if grid.shape[0] < h or grid.shape[1] < w:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(grid, (h, w, 3))[..., 0, :, :, :]
            for y, x in zip(*np.nonzero((windows == small).all(axis=(-3, -2, -1)))):
                if (picture[oy + y * scale:oy + (y + h) * scale, ox + x * scale:ox + (x + w) * scale] == block).all():
                    return True
    return False


def test_a_grid_has_one_labelled_row_per_class_and_each_samples_attribution_under_it(tmp_path):
    """The composed grid's rows were classes without labels; grids of different compartments looked alike."""
    images = torch.zeros(7, 1, 8, 8)  # black images: anything drawn over one would show
    labels = torch.tensor([3, 1, 3, 1, 1, 7, 3])
    attribution = torch.tensor([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 2 + [[0.5, 0.5, 0]] * 2)
    layout = image_grid(images, tmp_path / "g.png", labels, caption="seven black samples", attribution=attribution)
    picture = read(tmp_path / "g.png")
    assert picture.shape[:2] == layout.size and layout.cell == (64, 64)  # 8x8 digits drawn at 8x
    assert [len(row) for row in layout.cells] == [3, 3, 1]  # classes 1, 3, 7: as many images per row as samples of the class
    assert bright(picture[:CAPTION_LINE]) and bright(picture[-CAPTION_LINE:])  # caption above, legend below
    for (label_y, label_x), row in zip(layout.labels, layout.cells):
        margin = picture[label_y:label_y + CAPTION_LINE, label_x:row[0][1] - 2]
        assert bright(margin), "a class row without its label"
    order = torch.argsort(labels, stable=True).tolist()  # the samples, row by row
    for i, (y, x) in enumerate(cell for row in layout.cells for cell in row):
        assert (picture[y:y + 64, x:x + 64] == 0).all(), "something was drawn over an image"
        strip = picture[y + 64 + 1:y + 64 + 1 + STRIP, x:x + 64].reshape(-1, 3)
        drawn = {tuple(colour) for colour in strip.tolist()}
        expected = {ImageColor.getrgb(PALETTE[k]) for k in torch.nonzero(attribution[order[i]]).flatten().tolist()}
        assert drawn == expected, f"sample {order[i]}'s strip shows {drawn}, its attribution {expected}"


def test_guard_rows_show_the_difference_and_each_samples_nearest_training_image(tmp_path):
    train = Dataset(("a", "b"), torch.stack([torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 1.0)]), None)
    unguarded = torch.full((2, 1, 8, 8), 0.1)  # nearest: the black training image
    unguarded[1] = 0.9  # nearest: the white one
    guarded = unguarded.clone()
    guarded[0, 0, 2, 3] += 0.2  # the guard moved one pixel of the first sample
    rows = guard_rows(unguarded, guarded, train)
    assert [row.label for row in rows][:3] == ["unguarded", "nearest training", "guarded, same seed"]
    assert torch.equal(rows[1].images[:, 0], torch.stack([torch.zeros(8, 8), torch.ones(8, 8)]))
    difference = rows[3].images  # red: |guarded - unguarded| x DIFFERENCE_GAIN
    assert float(difference[0, 0, 2, 3]) == pytest.approx(DIFFERENCE_GAIN * 0.2) and difference[0, 0].sum() == difference[0, 0, 2, 3]
    assert float(difference[1].abs().sum()) == 0 and rows[3].notes == ["max 0.20", "max 0.00"]
    layout = draw_rows(rows, tmp_path / "g.png", caption="what a guard changed")
    picture = read(tmp_path / "g.png")
    y, x = layout.cells[3][0]
    assert tuple(picture[y + 2 * 8, x + 3 * 8]) == (204, 51, 0)  # 0.8 red, 0.2 green: the moved pixel
    assert (picture[y:y + 64, x + 5 * 8:x + 64] == 0).all()  # unchanged pixels stay black


def test_a_forgotten_image_is_shown_beside_its_nearest_samples_before_and_after(ward_copy, tmp_path):
    data = ward_copy.training_data()
    victims = list(data.ids[:2])
    picture = ForgetPicture.before_forget(ward_copy, victims + ["digits:not-held"], steps=4)
    assert picture.ids == victims
    ward_copy.forget(victims)
    layout = picture.draw(ward_copy, tmp_path / "f.png")
    png = read(tmp_path / "f.png")
    assert png.shape[:2] == layout.size and [len(row) for row in layout.cells] == [1 + 2 * NEAREST] * 2
    for m, victim in enumerate(victims):
        y, x = layout.cells[m][0]
        expected = pixels((data.images[m:m + 1] + 1) / 2, 8)[0]
        assert (png[y:y + 64, x:x + 64] == expected).all(), f"{victim}'s pixels are not in the picture"
        for y, x in layout.cells[m]:  # a distance (or "forgotten") under every image
            band = png[y + 64:y + 64 + 12, x:x + 64]
            assert ((band == NOTE).all(axis=-1)).any()
        assert bright(png[layout.labels[m][0]:layout.labels[m][0] + CAPTION_LINE, :layout.cells[m][0][1]])  # the ID
    assert picture.before.images.shape[0] == 2 * 16


def test_forget_show_writes_the_picture(monkeypatch, capsys, trained_ward_dir, tmp_path):
    from test_cli import _main

    shutil.copytree(trained_ward_dir, tmp_path / "w")
    from dataward.ward import Ward

    ward = Ward.open(tmp_path / "w")
    victim, image = ward.training_data().ids[0], ward.training_data().images[0]
    ward.close()
    code, out, _ = _main(monkeypatch, capsys, "forget", tmp_path / "w", victim, "--show", tmp_path / "f.png")
    assert code == 0 and "beside its nearest samples before and after" in out
    assert has_block(read(tmp_path / "f.png"), (image + 1) / 2)
    code, _, err = _main(monkeypatch, capsys, "forget", tmp_path / "w", victim, "--show", tmp_path / "no" / "f.png")
    assert code == 1 and "does not exist" in err
