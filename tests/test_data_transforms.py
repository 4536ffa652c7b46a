"""ImageTransform: output format, shorter-side resize + crop geometry, flips, reproducibility."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdkd.data.sources.transforms import ImageTransform, resize_shorter_side, to_tensor

GREEN = (0, 200, 0)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def stripes(w: int, h: int) -> Image.Image:
    """Red left quarter, green middle half, blue right quarter."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 4] = (255, 0, 0)
    a[:, w // 4 : 3 * w // 4] = GREEN
    a[:, 3 * w // 4 :] = (0, 0, 255)
    return Image.fromarray(a)


def halves(size: int) -> Image.Image:
    """Left half red, right half blue: changes under a horizontal flip."""
    a = np.zeros((size, size, 3), np.uint8)
    a[:, : size // 2] = (255, 0, 0)
    a[:, size // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


@pytest.mark.parametrize("w,h", [(100, 50), (50, 100), (64, 64), (20, 12), (333, 217)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_shape_dtype_range(w, h, mode):
    image = Image.new(mode, (w, h))
    for center_crop in (True, False):
        out = ImageTransform(32, center_crop=center_crop)(image, rng(0))
        assert out.pixel_values.shape == (3, 32, 32)
        assert out.pixel_values.dtype == torch.float32
        assert out.pixel_values.is_contiguous()
        assert out.original_size == (h, w)


def test_value_range_endpoints():
    black = ImageTransform(16)(Image.new("RGB", (40, 20), (0, 0, 0)), rng(0)).pixel_values
    white = ImageTransform(16)(Image.new("RGB", (40, 20), (255, 255, 255)), rng(0)).pixel_values
    assert torch.all(black == -1.0) and torch.all(white == 1.0)
    noise = Image.fromarray(rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    values = ImageTransform(24, center_crop=False)(noise, rng(2)).pixel_values
    assert values.min() >= -1.0 and values.max() <= 1.0


def test_resize_shorter_side_keeps_aspect():
    assert resize_shorter_side(Image.new("RGB", (100, 50)), 32).size == (64, 32)
    assert resize_shorter_side(Image.new("RGB", (50, 100)), 32).size == (32, 64)
    assert resize_shorter_side(Image.new("RGB", (300, 200)), 32).size == (48, 32)
    assert resize_shorter_side(Image.new("RGB", (10, 15)), 32).size == (32, 48)  # upsamples


@pytest.mark.parametrize("w,h,expected", [(100, 50, (0, 16)), (50, 100, (16, 0)), (32, 32, (0, 0))])
def test_center_crop_geometry(w, h, expected):
    out = ImageTransform(32, center_crop=True, random_flip=False)(stripes(w, h), rng(0))
    assert out.original_size == (h, w)
    assert out.crop_top_left == expected


def test_center_crop_takes_the_middle():
    # 100x50 -> 64x32 -> columns 16..47: the green band (edge columns blend in the filter).
    out = ImageTransform(32, center_crop=True, random_flip=False)(stripes(100, 50), rng(0))
    rgb = ((out.pixel_values + 1) * 127.5).round()
    inner = rgb[:, :, 1:-1]
    assert torch.all(inner == torch.tensor(GREEN, dtype=torch.float32)[:, None, None])


def test_random_crop_is_the_stated_window():
    image = Image.fromarray(rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    resized = resize_shorter_side(image, 32)  # 48x32
    transform = ImageTransform(32, center_crop=False, random_flip=False)
    offsets = set()
    for seed in range(40):
        out = transform(image, rng(seed))
        top, left = out.crop_top_left
        assert top == 0 and 0 <= left <= 16
        expected = to_tensor(resized.crop((left, top, left + 32, top + 32)))
        torch.testing.assert_close(out.pixel_values, expected, rtol=0, atol=0)
        offsets.add(left)
    assert len(offsets) > 5


def test_flip_flips():
    transform = ImageTransform(16, random_flip=True)
    plain = ImageTransform(16, random_flip=False)(halves(16), rng(0)).pixel_values
    flips = 0
    for seed in range(64):
        out = transform(halves(16), rng(seed)).pixel_values
        flipped = torch.equal(out, plain.flip(-1))
        assert flipped or torch.equal(out, plain)
        flips += flipped
    assert 16 <= flips <= 48  # p = 0.5
    assert not torch.equal(plain, plain.flip(-1))


def test_no_flip_when_disabled():
    transform = ImageTransform(16, random_flip=False)
    first = transform(halves(16), rng(0)).pixel_values
    assert all(torch.equal(transform(halves(16), rng(s)).pixel_values, first) for s in range(20))


def test_flip_then_crop_offset_refers_to_flipped_image():
    image = Image.fromarray(rng(4).integers(0, 256, (32, 80, 3), dtype=np.uint8))
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    seen = set()
    for seed in range(40):
        g = np.random.default_rng(seed)
        flip = g.random() < 0.5  # the transform's first draw
        out = transform(image, rng(seed))
        top, left = out.crop_top_left
        source = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
        expected = to_tensor(source.crop((left, top, left + 32, top + 32)))
        torch.testing.assert_close(out.pixel_values, expected, rtol=0, atol=0)
        seen.add(flip)
    assert seen == {True, False}


def test_same_generator_seed_same_output():
    image = Image.fromarray(rng(5).integers(0, 256, (70, 45, 3), dtype=np.uint8))
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    a, b = transform(image, rng(7)), transform(image, rng(7))
    assert torch.equal(a.pixel_values, b.pixel_values) and a.crop_top_left == b.crop_top_left


def test_rejects_bad_resolution():
    with pytest.raises(ValueError, match="resolution"):
        ImageTransform(0)


def test_interpolation_modes_resize_differently():
    from sdkd.data.sources.transforms import INTERPOLATIONS

    image = Image.fromarray(rng(3).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    resized = {mode: ImageTransform(16, interpolation=mode)(image, rng(0)).pixel_values for mode in INTERPOLATIONS}
    assert all(not torch.equal(resized[a], resized[b]) for a in INTERPOLATIONS for b in INTERPOLATIONS if a < b)
    assert torch.equal(ImageTransform(16)(image, rng(0)).pixel_values, resized["bilinear"])  # today's default
    # nearest only copies source pixels.
    source = {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
    assert {tuple(p) for p in np.asarray(resize_shorter_side(image, 16, "nearest")).reshape(-1, 3)} <= source
    with pytest.raises(ValueError, match="interpolation must be one of nearest, bilinear"):
        ImageTransform(16, interpolation="cubic")


# ---------------------------------------------------------------------------------------------
# Preprocess: caption choice, dropout, size check


from sdkd.data.sources.transforms import BadSample, Preprocess, caption_candidates, dropout_rng  # noqa: E402


def test_caption_candidates_first_and_random():
    fields = {"a": "", "b": ["x", "y"], "c": "z", "d": None}
    assert caption_candidates(fields, ["d", "b", "c"], "first") == ["x", "y"]
    assert caption_candidates(fields, ["a", "c"], "first") == [""]  # an empty string is a caption
    assert caption_candidates(fields, ["b", "c"], "random") == ["x", "y", "z"]
    assert caption_candidates(fields, ["d", "e"], "first") == []


def test_preprocess_caption_and_errors():
    p = Preprocess(ImageTransform(8), ("text", "alt"), "random")
    drawn = {p.caption({"text": "t", "alt": ["u", "v"]}, rng(s), "k") for s in range(30)}
    assert drawn == {"t", "u", "v"}
    with pytest.raises(BadSample, match="^k: no caption"):
        p.caption({"other": "t"}, rng(0), "k")
    small = Preprocess(ImageTransform(8), min_size=16)
    with pytest.raises(BadSample, match="^k: image 15x20 is smaller than data.min_size=16"):
        small(Image.new("RGB", (15, 20)), "c", rng(0), rng(1), "k")
    out = small(Image.new("RGB", (16, 20)), "c", rng(0), rng(1), "k")
    assert out["caption"] == "c" and out["key"] == "k" and out["pixel_values"].shape == (3, 8, 8)


def test_caption_dropout_rate_and_own_stream():
    p = Preprocess(ImageTransform(8, random_flip=True), caption_dropout=0.3)
    image = halves(8)
    dropped = [p(image, "c", rng(i), dropout_rng(0, 0, i), "k")["caption"] == "" for i in range(400)]
    assert 0.22 < sum(dropped) / 400 < 0.38
    # Dropout draws do not move the augmentation: same pixels with and without dropout.
    plain = Preprocess(ImageTransform(8, random_flip=True))
    for i in range(20):
        a = p(image, "c", rng(i), dropout_rng(0, 0, i), "k")["pixel_values"]
        b = plain(image, "c", rng(i), dropout_rng(0, 0, i), "k")["pixel_values"]
        assert torch.equal(a, b)
    assert Preprocess(ImageTransform(8), caption_dropout=1.0)(image, "c", rng(0), rng(0), "k")["caption"] == ""


def test_caption_dropout_draws_anew_each_epoch():
    """Which of 200 captions are dropped depends on the epoch: epoch 1 drops others than epoch 0, and epoch 0
    the same ones again."""
    p, image = Preprocess(ImageTransform(8), caption_dropout=0.5), halves(8)

    def dropped(epoch: int) -> list[int]:
        return [i for i in range(200) if p(image, "c", rng(i), dropout_rng(0, epoch, i), "k")["caption"] == ""]

    assert dropped(0) == dropped(0) and dropped(0) != dropped(1)
