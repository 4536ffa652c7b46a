"""Sample grids: prompts above the columns, row labels on the left, drawn with PIL's default font."""

import numpy as np
from PIL import Image

from sdkd.train.engine.sampling import LABEL_CELL, make_grid

PROMPTS = ["a red circle on a blue background, and a very long prompt that has to be wrapped and cut short",
           "an astronaut"]


def _rows(size: int) -> list[list[Image.Image]]:
    return [[Image.new("RGB", (size, size), c) for c in ("red", "blue")] for _ in range(2)]


def test_plain_grid_is_the_images_side_by_side():
    grid = make_grid(_rows(32))
    assert grid.size == (64, 64)
    assert grid.getpixel((40, 40)) == (0, 0, 255)


def test_prompt_band_above_the_columns():
    plain = make_grid(_rows(LABEL_CELL))
    labelled = make_grid(_rows(LABEL_CELL), PROMPTS)
    band = labelled.height - plain.height
    assert labelled.width == plain.width and 10 < band < 60  # one to three lines of text
    assert np.array_equal(np.asarray(labelled)[band:], np.asarray(plain))  # the images, moved down
    dark = np.asarray(labelled.convert("L"))[:band] < 128  # text pixels
    text_rows = [dark[:, x * LABEL_CELL:(x + 1) * LABEL_CELL].any(axis=1).sum() for x in range(2)]
    assert text_rows[1] > 0 and text_rows[0] > 2 * text_rows[1]  # the long prompt wraps to three lines
    other = make_grid(_rows(LABEL_CELL), ["something else", "an astronaut"])
    assert not np.array_equal(np.asarray(other)[:band], np.asarray(labelled)[:band])  # the band shows the prompt


def test_row_labels_and_small_images_scaled_up():
    grid = make_grid(_rows(32), PROMPTS, ["teacher", "student step 30"])
    plain = make_grid(_rows(32))
    assert grid.width > 2 * LABEL_CELL and grid.height > 2 * LABEL_CELL  # 32 px cells drawn at 128 px
    left, top = grid.width - 2 * LABEL_CELL, grid.height - 2 * LABEL_CELL
    assert np.array_equal(np.asarray(grid.crop((left, top, grid.width, grid.height)).resize((64, 64),
                                                                                          Image.NEAREST)),
                          np.asarray(plain))
    label_band = np.asarray(grid.convert("L"))[top:, :left]
    for y in range(2):
        assert (label_band[y * LABEL_CELL:(y + 1) * LABEL_CELL] < 128).any()
