"""Turn an image folder or a Hugging Face data set into WebDataset shards plus a manifest.

    python data/make_shards.py SRC OUT_DIR [--shard-size 1000] [--resize 512] [--quality 95]
                               [--image-column COL] [--caption-column 'text;caption'] [--split train]
                               [--workers 2]

SRC is an image folder (images + metadata.jsonl or metadata.csv, or a caption file beside each image:
`0001.png` + `0001.txt`, subfolders too), or what `data.source=hf` reads: a hub
name, a local data-set folder or a .parquet/.arrow file. OUT_DIR receives `shard-000000.tar`, ... written
by webdataset's `ShardWriter` (per sample `KEY.jpg|png|webp`, `KEY.txt` with the first caption, `KEY.json`
with every caption field found plus `original_width`/`original_height` and `source`), and
`manifest.json` with the sample count of every shard, which trainers read for their epochs:

    accelerate launch train/kd.py --config ... data.source=webdataset data.path=OUT_DIR

Every image is decoded once: unreadable images and rows without a caption are left out, named on
stderr and counted in the manifest (`skipped`). With `--resize N` an image whose shorter side exceeds N
is resized to N (bilinear, aspect kept) and stored as JPEG; otherwise the original bytes are stored.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sdkd.cli import limits
from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import refuse_links, same_file, write_text
from sdkd.cli.words import counted
from sdkd.data.sources.core import ImageFolder, is_image_folder, open_image
from sdkd.data.sources.transforms import (
    BadSample,
    ImageTransform,
    Preprocess,
    caption_candidates,
    resize_shorter_side,
)

MANIFEST = "manifest.json"
FORMAT = "sdkd-shards"
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class _Rows(Dataset):
    """Row `i` of the source -> {"key", "image": (ext, bytes), "meta": {...}, "caption"} or {"skip": reason}."""

    def __init__(self, src: str, image_column: str | None, caption_fields: list[str], split: str,
                 resize: int | None, quality: int):
        self.src, self.caption_fields, self.resize, self.quality = src, caption_fields, resize, quality
        # The readers only list and read rows here; their preprocessing is never run.
        preprocess = Preprocess(ImageTransform(8), tuple(caption_fields))
        if is_image_folder(Path(src), preprocess.caption_fields) or _holds_images(Path(src)):
            # A folder of images without captions is an image folder whose captions are missing (said so by its
            # reader), not a data set for `datasets` to guess at.
            self.kind = "imagefolder"
            self.records = ImageFolder(src, preprocess, 0, image_column or "file_name")
        else:
            from sdkd.data.sources.hf_source import HFImageDataset

            self.kind = "hf"
            hf = HFImageDataset(src, split, preprocess, 0, image_column or "image")
            self.records, self.image_column = hf.data, hf.image_column

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> tuple[Image.Image, bytes | None, dict, str]:
        if self.kind == "imagefolder":
            path, captions = self.records.captions(index)
            return open_image(path), path.read_bytes(), captions, str(path)
        from sdkd.data.sources.hf_source import decode_image

        row = self.records[index]
        value, name = row[self.image_column], f"{self.src} row {index}"
        raw = value.get("bytes") if isinstance(value, dict) else None
        if isinstance(value, dict) and raw is None and value.get("path"):
            raw = Path(value["path"]).read_bytes()
        captions = {f: row[f] for f in self.caption_fields if row.get(f) is not None}
        return decode_image(value, name), raw, captions, name

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image, raw, captions, name = self._load(index)
            candidates = caption_candidates(captions, self.caption_fields, "first")
            if not candidates:
                raise BadSample(f"{name}: no caption (fields {', '.join(self.caption_fields)})")
        except (BadSample, OSError) as err:
            return {"skip": str(err)}
        meta = {**captions, "original_width": image.width, "original_height": image.height, "source": name}
        fmt = Image.open(io.BytesIO(raw)).format if raw is not None else None  # the decoded copy has none
        if (self.resize and min(image.size) > self.resize) or raw is None or fmt not in _EXT:
            if self.resize and min(image.size) > self.resize:
                image = resize_shorter_side(image.convert("RGB"), self.resize)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=self.quality)
            ext, raw = "jpg", buffer.getvalue()
        else:
            ext = _EXT[fmt]
        return {"key": f"{index:09d}", "ext": ext, "bytes": raw, "caption": candidates[0], "meta": meta}


def _holds_images(folder: Path) -> bool:
    """A local folder with image files and no data-set files (parquet, arrow, a saved `datasets` folder)."""
    if not folder.is_dir() or any(folder.glob("dataset_*.json")):
        return False
    suffixes = {p.suffix.lower() for p in folder.rglob("*") if p.is_file()}
    return not suffixes & {".parquet", ".arrow"} and bool(suffixes & set(Image.registered_extensions()))


# The readers are the trainers' (data.source=imagefolder or hf): their messages name the trainers' keys, which
# this command takes as these.
_OWN_NAMES = {"config key 'data.caption_column'": "--caption-column", "data.caption_column": "--caption-column",
              "config key 'data.image_column'": "--image-column", "data.image_column": "--image-column",
              "data.path": "SRC", "data.split": "--split"}


def _rows(*args) -> "_Rows":
    try:
        return _Rows(*args)
    except UserError as err:
        message = str(err)
        for key, name in _OWN_NAMES.items():
            message = message.replace(key, name)
        raise UserError(message) from None


def make_shards(src: str, out: str | Path, *, shard_size: int = 1000, resize: int | None = None,
                quality: int = 95, image_column: str | None = None, caption_column: str = "text;txt;caption",
                split: str = "train", workers: int = 0, log=print) -> dict:
    """Write the shards and the manifest; returns the manifest."""
    import webdataset as wds

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; give a folder for the shards")
    if same_file(out, src):
        raise UserError(f"{out}: is the input '{src}'; give another folder for the shards")
    if list(out.glob("shard-*.tar")) or (out / MANIFEST).exists() or (out / MANIFEST).is_symlink():
        raise UserError(f"{out}: already holds shards; use an empty folder")
    refuse_links(out, "out")
    rows = _rows(src, image_column, [f for f in caption_column.split(";") if f], split, resize, quality)
    out.mkdir(parents=True, exist_ok=True)  # once the source is known to be one
    loader = DataLoader(rows, batch_size=None, num_workers=workers)
    counts: dict[str, int] = {}
    skipped = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as writer:
        for row in loader:
            if "skip" in row:
                log(f"warning: skipped {row['skip']}")
                skipped += 1
                continue
            writer.write({"__key__": row["key"], row["ext"]: row["bytes"], "txt": row["caption"],
                          "json": json.dumps(row["meta"], ensure_ascii=False)})
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        raise UserError(f"{src}: no sample could be written ({skipped} skipped)")
    manifest = {
        "format": FORMAT,
        "samples": sum(counts.values()),
        "shards": [{"name": name, "samples": n} for name, n in counts.items()],
        "source": str(src),
        "resize": resize,
        "skipped": skipped,
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="image folder, hub name, local data-set folder or .parquet/.arrow file")
    parser.add_argument("out", help="folder for shard-NNNNNN.tar and manifest.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--resize", type=int, default=None, help="resize the shorter side down to this many pixels")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    parser.add_argument("--image-column", default=None, help="image field (default file_name / image)")
    parser.add_argument("--caption-column", default="text;txt;caption",
                        help="caption field(s), 'a;b' (default text;txt;caption)")
    parser.add_argument("--split", default="train", help="data-set split (default train)")
    parser.add_argument("--workers", type=int, default=0, help="decoding worker processes (default 0)")
    args = parser.parse_args(argv)
    limits.check_int(args.shard_size, "--shard-size", 1, limits.MAX_IMAGES)
    if args.resize is not None:
        limits.check_int(args.resize, "--resize", 8, limits.MAX_SIDE)
    limits.check_int(args.quality, "--quality", 1, 100)  # PIL's JPEG quality scale (95: its best useful)
    limits.check_int(args.workers, "--workers", 0, limits.MAX_WORKERS)
    manifest = make_shards(args.src, args.out, shard_size=args.shard_size, resize=args.resize, quality=args.quality,
                           image_column=args.image_column, caption_column=args.caption_column, split=args.split,
                           workers=args.workers, log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {counted(manifest['samples'], 'sample')} in {counted(len(manifest['shards']), 'shard')} "
          f"to {args.out} ({manifest['skipped']} skipped)")
    print(f"next: accelerate launch train/kd.py --config configs/tiny.yaml data.source=webdataset "
          f"data.path={shlex.quote(str(args.out))}")


if __name__ == "__main__":
    run_cli(main)
