"""Sources: ImageFolder (real files), SyntheticCaptions, epochs and resumability, user errors,
the registry, collate and a multi-worker DataLoader."""

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sdkd.cli.errors import UserError
from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.core import (
    COLOURS,
    SHAPES,
    SOURCES,
    CorruptImageError,
    ImageFolder,
    SyntheticCaptions,
    build_dataset,
    collate,
    open_image,
)
from sdkd.data.sources.transforms import ImageTransform

R = 32


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def write_metadata(folder, rows) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


# (file name, image, caption): sizes and aspect ratios vary; PNG, JPEG, RGBA and greyscale.
FILES = [
    ("wide.png", lambda: halves(100, 50), "a wide image"),
    ("tall.png", lambda: noise(50, 100, 1), "a tall image"),
    ("square.jpg", lambda: noise(64, 64, 2), "a square jpeg"),
    ("big.jpeg", lambda: noise(300, 200, 3), "a big jpeg"),
    ("alpha.png", lambda: noise(40, 60, 4).convert("RGBA"), "an rgba png"),
    ("sub/grey.png", lambda: noise(45, 45, 5).convert("L"), "a greyscale png in a subfolder"),
]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, make, _ in FILES:
        make().save(tmp_path / name)
    write_metadata(tmp_path, [{"file_name": n, "text": c} for n, _, c in FILES])
    return tmp_path


def make_folder_ds(path, seed=0, center_crop=False, random_flip=True, **kw):
    return ImageFolder(path, ImageTransform(R, center_crop, random_flip), seed, **kw)


def samples(ds):
    return [ds[i] for i in range(len(ds))]


def same_sample(a, b) -> bool:
    return (
        torch.equal(a["pixel_values"], b["pixel_values"])
        and a["caption"] == b["caption"]
        and a["crop_top_left"] == b["crop_top_left"]
    )


# ---------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder_samples(folder):
    ds = make_folder_ds(folder)
    assert len(ds) == len(FILES)
    for (_name, make, caption), sample in zip(FILES, samples(ds)):
        image = make()
        assert sample["caption"] == caption
        assert sample["pixel_values"].shape == (3, R, R)
        assert sample["pixel_values"].dtype == torch.float32
        assert -1 <= sample["pixel_values"].min() and sample["pixel_values"].max() <= 1
        assert sample["original_size"] == (image.height, image.width)


def test_imagefolder_center_crop_geometry(folder):
    wide = make_folder_ds(folder, center_crop=True, random_flip=False)[0]
    tall = make_folder_ds(folder, center_crop=True, random_flip=False)[1]
    # 100x50 -> 64x32, crop columns 16..47; 50x100 -> 32x64, crop rows 16..47.
    assert wide["original_size"] == (50, 100) and wide["crop_top_left"] == (0, 16)
    assert tall["original_size"] == (100, 50) and tall["crop_top_left"] == (16, 0)


def test_imagefolder_flip_actually_flips(folder):
    ds = make_folder_ds(folder, center_crop=True, random_flip=True)
    plain = make_folder_ds(folder, center_crop=True, random_flip=False)[0]["pixel_values"]
    assert not torch.equal(plain, plain.flip(-1))
    outcomes = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        out = ds[0]["pixel_values"]
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(-1))
        outcomes.add(torch.equal(out, plain))
    assert outcomes == {True, False}


def test_same_seed_epoch_index_same_sample(folder):
    a, b = make_folder_ds(folder, seed=3), make_folder_ds(folder, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    for i in reversed(range(len(a))):  # order of access must not matter
        assert same_sample(a[i], b[i])
    assert same_sample(a[2], a[2])


def test_epoch_and_seed_change_augmentation(folder):
    ds = make_folder_ds(folder, seed=0)
    epoch0 = samples(ds)
    ds.set_epoch(1)
    epoch1 = samples(ds)
    assert not all(same_sample(x, y) for x, y in zip(epoch0, epoch1))
    ds.set_epoch(0)  # a resumed run going back to epoch 0 sees the same samples
    assert all(same_sample(x, y) for x, y in zip(epoch0, samples(ds)))
    other_seed = samples(make_folder_ds(folder, seed=1))
    assert not all(same_sample(x, y) for x, y in zip(epoch0, other_seed))


def test_caption_lists_draw_one_per_epoch(tmp_path):
    noise(40, 40, 0).save(tmp_path / "a.png")
    write_metadata(tmp_path, [{"file_name": "a.png", "text": ["one", "two", "three"]}])
    ds = make_folder_ds(tmp_path)
    drawn = []
    for epoch in range(30):
        ds.set_epoch(epoch)
        drawn.append(ds[0]["caption"])
    assert set(drawn) == {"one", "two", "three"}
    ds.set_epoch(4)
    assert ds[0]["caption"] == drawn[4]


def test_custom_columns_and_blank_lines(tmp_path):
    noise(40, 30, 0).save(tmp_path / "x.png")
    write_metadata(tmp_path, ["", json.dumps({"image": "x.png", "prompt": "p", "extra": 1}), "   "])
    ds = make_folder_ds(tmp_path, image_column="image", caption_column="prompt")
    assert len(ds) == 1 and ds[0]["caption"] == "p"


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x20, shown rotated 90 degrees: 20 wide, 40 high
    noise(40, 20, 0).save(tmp_path / "r.jpg", exif=exif)
    write_metadata(tmp_path, [{"file_name": "r.jpg", "text": "rotated"}])
    assert make_folder_ds(tmp_path)[0]["original_size"] == (40, 20)


def test_index_out_of_range(folder):
    ds = make_folder_ds(folder)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds[-1]


# ---------------------------------------------------------------------------------------------
# User errors: one line naming the file (and line)


def error_of(path, **kw) -> str:
    with pytest.raises(UserError) as info:
        make_folder_ds(path, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    assert str(missing) in error_of(missing)


def test_missing_metadata(tmp_path):
    message = error_of(tmp_path)
    assert str(tmp_path / "metadata.jsonl") in message and "not found" in message


def test_line_not_json(folder):
    write_metadata(folder, [{"file_name": "wide.png", "text": "ok"}, '{"file_name": "tall.png", "text": '])
    message = error_of(folder)
    assert f"{folder / 'metadata.jsonl'}, line 2" in message and "JSON" in message


def test_line_not_an_object(folder):
    write_metadata(folder, [{"file_name": "wide.png", "text": "ok"}, "", '["wide.png", "x"]'])
    assert f"{folder / 'metadata.jsonl'}, line 3" in error_of(folder)


def test_line_without_image_column(folder):
    write_metadata(folder, [{"file_name": "wide.png", "text": "ok"}, {"text": "ok"}])
    message = error_of(folder)
    assert f"{folder / 'metadata.jsonl'}, line 2" in message and "'file_name'" in message


@pytest.mark.parametrize("kw", [{}, {"caption_column": "caption"}])
def test_no_line_with_a_caption_field(folder, kw):
    write_metadata(folder, [{"file_name": "wide.png", "other": "x"}, {"file_name": "tall.png"}])
    message = error_of(folder, **kw)
    assert "no line has a caption field" in message and "data.caption_column" in message


def test_line_without_caption_is_a_skipped_sample(folder):
    write_metadata(folder, [{"file_name": "wide.png", "text": "ok"}, {"file_name": "tall.png", "text": None}])
    ds = make_folder_ds(folder)
    assert ds[0]["caption"] == "ok"
    assert ds[1] == {"skip": f"{folder / 'tall.png'}: no caption (fields text)"}


def test_image_file_not_found(folder):
    write_metadata(folder, [{"file_name": "wide.png", "text": "ok"}, {"file_name": "gone.png", "text": "x"}])
    message = error_of(folder)
    assert "line 2" in message and "gone.png" in message


def test_bad_caption_type(folder):
    write_metadata(folder, [{"file_name": "wide.png", "text": 3}])
    assert "line 1" in error_of(folder)


def test_empty_metadata(folder):
    write_metadata(folder, [""])
    assert "no samples" in error_of(folder)


def test_corrupt_image_is_a_skip_marker_naming_the_file(folder):
    (folder / "tall.png").write_bytes(b"not a png")
    ds = make_folder_ds(folder)  # start-up does not decode images
    marker = ds[1]
    assert set(marker) == {"skip"} and str(folder / "tall.png") in marker["skip"] and "cannot read" in marker["skip"]
    with pytest.raises(CorruptImageError, match="tall.png"):
        open_image(folder / "tall.png")


# ---------------------------------------------------------------------------------------------
# SyntheticCaptions


def synthetic(seed=0, n=48, random_flip=True):
    return SyntheticCaptions(n, ImageTransform(R, True, random_flip), seed)


def to_rgb(pixel_values: torch.Tensor, y: int, x: int) -> tuple:
    return tuple(((pixel_values[:, y, x] + 1) * 127.5).round().int().tolist())


def test_synthetic_captions_match_pixels():
    ds = synthetic(n=60)
    shapes = set()
    for sample in samples(ds):
        caption = sample["caption"]
        article, fg, shape, on, article2, bg, background = caption.split()
        assert (on, background) == ("on", "background") and shape in SHAPES and fg != bg
        assert article == ("an" if fg[0] in "aeiou" else "a")
        pixels = sample["pixel_values"]
        assert pixels.shape == (3, R, R)
        assert to_rgb(pixels, R // 2, R // 2) == COLOURS[fg]  # the shape covers the centre
        for y, x in ((0, 0), (0, R - 1), (R - 1, 0), (R - 1, R - 1)):
            assert to_rgb(pixels, y, x) == COLOURS[bg]
        assert sample["original_size"] == (R, R) and sample["crop_top_left"] == (0, 0)
        shapes.add(shape)
    assert shapes == set(SHAPES)


def test_synthetic_deterministic():
    a, b = synthetic(seed=7), synthetic(seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    assert all(same_sample(a[i], b[i]) for i in range(len(a)))
    other = synthetic(seed=8)
    other.set_epoch(2)
    assert sum(a[i]["caption"] != other[i]["caption"] for i in range(len(a))) > len(a) // 2


def test_synthetic_epoch_changes_only_the_flip():
    ds = synthetic(seed=1)
    epoch0 = samples(ds)
    ds.set_epoch(1)
    flips = 0
    for x, y in zip(epoch0, samples(ds)):
        assert x["caption"] == y["caption"]
        same = torch.equal(x["pixel_values"], y["pixel_values"])
        assert same or torch.equal(x["pixel_values"], y["pixel_values"].flip(-1))
        flips += not same
    assert flips > 0


def test_synthetic_distinct_images():
    ds = synthetic(n=32, random_flip=False)
    images = {s["pixel_values"].numpy().tobytes() for s in samples(ds)}
    assert len(images) == 32


# ---------------------------------------------------------------------------------------------
# Registry, collate, DataLoader


def test_registry_builds_each_source(folder):
    assert {"synthetic", "imagefolder"} <= set(SOURCES)
    syn = build_dataset(DataConfig(source="synthetic", resolution=R, num_samples=5), seed=0)
    assert isinstance(syn, SyntheticCaptions) and len(syn) == 5
    cfg = DataConfig(source="imagefolder", path=str(folder), resolution=R, center_crop=False, random_flip=False)
    img = build_dataset(cfg, seed=0)
    assert isinstance(img, ImageFolder) and img[0]["pixel_values"].shape == (3, R, R)
    assert img.transform == ImageTransform(R, center_crop=False, random_flip=False)


@pytest.mark.parametrize(
    "cfg,key",
    [
        (DataConfig(source="laion"), "data.source"),
        (DataConfig(source="imagefolder", path=None), "data.path"),
        (DataConfig(source="synthetic", num_samples=0), "data.num_samples"),
    ],
)
def test_registry_user_errors(cfg, key):
    with pytest.raises(UserError, match=key):
        build_dataset(cfg, seed=0)


def test_max_train_samples_keeps_the_first_n(folder):
    cfg = DataConfig(source="imagefolder", path=str(folder), resolution=R, interpolation="lanczos")
    full = build_dataset(cfg, seed=0)
    assert full.transform.interpolation == "lanczos"
    cut = build_dataset(dataclasses.replace(cfg, max_train_samples=4), seed=0)
    assert len(cut) == 4 and len(full) == len(FILES)
    for epoch in (0, 1):
        full.set_epoch(epoch)
        cut.set_epoch(epoch)  # reaches the dataset: the same augmentation
        assert all(same_sample(cut[i], full[i]) for i in range(4))
    with pytest.raises(IndexError):
        cut[4]
    copy = pickle.loads(pickle.dumps(cut))
    assert len(copy) == 4 and same_sample(copy[3], cut[3])
    assert [len(b["captions"]) for b in DataLoader(cut, batch_size=3, collate_fn=collate)] == [3, 1]
    more = build_dataset(DataConfig(source="synthetic", resolution=R, num_samples=5, max_train_samples=50), seed=0)
    assert len(more) == 5


def test_collate(folder):
    batch = collate(samples(make_folder_ds(folder))[:4])
    assert batch["pixel_values"].shape == (4, 3, R, R)
    assert batch["captions"] == [c for _, _, c in FILES[:4]]
    for key in ("original_size", "crop_top_left"):
        assert batch[key].dtype == torch.long and batch[key].shape == (4, 2)
    assert batch["original_size"][0].tolist() == [50, 100]


def test_dataset_pickles(folder):
    ds = make_folder_ds(folder, seed=4)
    ds.set_epoch(3)
    copy = pickle.loads(pickle.dumps(ds))
    assert all(same_sample(ds[i], copy[i]) for i in range(len(ds)))


def test_dataloader_with_workers(folder):
    ds = make_folder_ds(folder, seed=2)
    ds.set_epoch(1)
    expected = collate(samples(ds))
    loader = DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2)
    batches = list(loader)
    assert [len(b["captions"]) for b in batches] == [4, 2]
    got = {k: torch.cat([b[k] for b in batches]) for k in ("pixel_values", "original_size", "crop_top_left")}
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key
    assert sum((b["captions"] for b in batches), []) == expected["captions"]


# ---------------------------------------------------------------------------------------------
# Bad data: planted corrupt files are skipped, named and reported by collate


def test_planted_bad_files_are_skipped_and_named(tmp_path):
    noise(64, 48, 0).save(tmp_path / "good.jpg")
    noise(64, 64, 1).save(tmp_path / "trunc.jpg")
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "trunc.jpg").read_bytes()[:300])
    (tmp_path / "text.png").write_text("not an image at all")
    noise(10, 12, 2).save(tmp_path / "tiny.png")
    noise(40, 40, 3).save(tmp_path / "nocap.png")
    write_metadata(tmp_path, [{"file_name": n, "text": "c"} for n in ("good.jpg", "trunc.jpg", "text.png", "tiny.png")]
                   + [{"file_name": "nocap.png"}])
    ds = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=R, min_size=16), seed=0)
    batches = list(DataLoader(ds, batch_size=5, collate_fn=collate, num_workers=2))
    (batch,) = batches
    assert batch["captions"] == ["c"] and batch["pixel_values"].shape == (1, 3, R, R)
    assert batch["keys"] == [str(tmp_path / "good.jpg")]
    trunc, text, tiny, nocap = batch["skipped"]
    assert trunc.startswith(f"{tmp_path / 'trunc.jpg'}: cannot read image")
    assert text.startswith(f"{tmp_path / 'text.png'}: cannot read image")
    assert tiny == f"{tmp_path / 'tiny.png'}: image 10x12 is smaller than data.min_size=16"
    assert nocap == f"{tmp_path / 'nocap.png'}: no caption (fields text, txt, caption)"


def test_a_batch_of_only_bad_samples_collates_empty():
    batch = collate([{"skip": "a: x"}, {"skip": "b: y"}])
    assert batch == {"skipped": ["a: x", "b: y"], "captions": [], "keys": []}


def test_metadata_csv(tmp_path):
    noise(40, 30, 0).save(tmp_path / "a.png")
    noise(30, 40, 1).save(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a, with comma"\nb.png,\n')
    ds = make_folder_ds(tmp_path)
    assert len(ds) == 2 and ds[0]["caption"] == "a, with comma"
    assert "no caption" in ds[1]["skip"]  # an empty cell is a missing caption
