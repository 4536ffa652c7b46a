"""Reading back the colours of a captioned-shapes image, to check that generated images match their captions.

A synthetic image (data/sources/core.py `draw_shape`) is one flat shape on a flat background that fills the
border. `read_colours` takes the background from the border pixels and the foreground from the pixels
farthest from that background colour (the centre ones when none stands out), each matched to the nearest
of the source's named colours. Pure numpy and PIL: it knows nothing of models or training, so it can
judge a teacher's samples (tests/test_toy_world.py, train/make_toy_teacher.py).
"""

from __future__ import annotations

import itertools
import re

import numpy as np
from PIL import Image

from sdkd.data.sources.core import COLOURS, SHAPES

NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[name] for name in NAMES], dtype=np.float64)
CHANCE = 1 / len(NAMES)
"""The rate at which a blind guess of one named colour matches a caption's."""
_CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


def nearest_colour(rgb) -> str:
    """The named colour nearest to `rgb` (Euclidean distance in RGB)."""
    return NAMES[int(np.argmin(((PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)))]


def read_colours(image: Image.Image, min_contrast: float = 40.0) -> tuple[str, str]:
    """(foreground, background) named colours of `image`.

    Background: the per-channel median of the border pixels. Foreground: the median of the pixels at least
    half as far from the background colour as the farthest one; when no pixel is `min_contrast` away (an image
    with no visible shape), the median of the central quarter."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.sqrt(((a - background) ** 2).sum(axis=-1))
    if distance.max() >= min_contrast:
        foreground = np.median(a[distance >= 0.5 * distance.max()], axis=0)
    else:
        h, w = distance.shape
        foreground = np.median(a[h // 4:h - h // 4, w // 4:w - w // 4].reshape(-1, 3), axis=0)
    return nearest_colour(foreground), nearest_colour(background)


def caption_colours(caption: str) -> tuple[str, str]:
    """(foreground, background) of a synthetic caption, "a red circle on a blue background"."""
    m = _CAPTION.match(caption)
    if m is None or m.group(1) not in COLOURS or m.group(3) not in COLOURS:
        raise ValueError(f"not a synthetic-shapes caption: {caption!r}")
    return m.group(1), m.group(3)


def check_captions(n: int, seed: int = 0) -> list[str]:
    """`n` synthetic captions (at most one per ordered colour pair, 56), shapes in turn, in an order drawn from
    `seed`: every colour about as often as foreground as background."""
    pairs = list(itertools.permutations(NAMES, 2))
    order = np.random.default_rng(seed).permutation(len(pairs))[:n]
    article = lambda word: "an" if word[0] in "aeiou" else "a"  # noqa: E731
    return [f"{article(fg)} {fg} {SHAPES[i % len(SHAPES)]} on {article(bg)} {bg} background"
            for i, (fg, bg) in enumerate(pairs[j] for j in order)]


def hits(image: Image.Image, caption: str) -> tuple[bool, bool]:
    """Whether the foreground and the background colour read from `image` are those `caption` names."""
    return tuple(read == wanted for read, wanted in zip(read_colours(image), caption_colours(caption)))


def is_check_caption(caption: str) -> bool:
    """Whether `caption` is a synthetic-shapes caption whose colours `hits` can check."""
    try:
        caption_colours(caption)
    except ValueError:
        return False
    return True


def match_rates(images: list[Image.Image], captions: list[str]) -> dict[str, float]:
    """How often the foreground, the background, and both read from each image match its caption's."""
    both = np.array([hits(image, caption) for image, caption in zip(images, captions)], dtype=bool).reshape(-1, 2)
    return {"fg": float(both[:, 0].mean()), "bg": float(both[:, 1].mean()), "both": float(both.all(1).mean()),
            "chance": CHANCE, "n": len(images)}
