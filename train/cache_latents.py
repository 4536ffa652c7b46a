"""Precompute VAE latents (posterior mean and std) and text embeddings of a training set, once.

    python train/cache_latents.py --config CONFIG data.cache=CACHE_DIR [--shard-size 1000] [--dtype fp32]
                                 [--batch-size N] [--from-samples [--sample-steps 4]] [key=value ...]

Reads the data the config describes (`data.source`, `data.path`, ..., at `data.resolution`, augmented as
epoch 0 of `train.seed` would be) with the teacher's VAE and text encoder, and writes the cache folder
`data.cache` (see `latent_cache.py`). Train from it with the same config and `data.cache=CACHE_DIR`: the
trainers then load no VAE or text encoder and run neither per step; they draw the latent from the cached
mean and std with the step's generator, so they see the same latents as without the cache.

`--dtype fp32` (default) keeps the posterior exactly; fp16 halves the folder (SD-1.5 at 512 px: about
130 KB of latents and 240 KB of CLIP-L embeddings per sample in fp32). Random crops, flips and caption
choices are frozen at their epoch-0 draw; caption dropout still happens per epoch at train time. With
`data.buckets`, samples are encoded in batches of one size and each shard holds one bucket; train from the cache
with the same `data.buckets`.
A webdataset source is read once in shard order (not resampled). Runs on one process (on the GPU when
there is one), with `train.num_workers` DataLoader workers decoding.

`--from-samples` stores instead the latents the teacher pipeline samples for each caption (seed
train.seed + i, `--sample-steps` steps, `sample.guidance_scale`): SDXS trains its tiny decoder on such
latents (train/tiny_decoder.py reads them with `data.cache`).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from sdkd.cli import limits
from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import refuse_links, same_file
from sdkd.cli.words import counted
from sdkd.train.engine.config import CHECK_CONFIG_HELP, _load_yaml, load_config
from sdkd.train.tasks.diffusion_config import KDConfig

# latent_cache.DTYPES's names. torch, the data sources and the models are imported only once the arguments
# and the output folder are checked: --help and --check-config answer at once.
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def load_recipe(path: str | None, overrides: list[str]) -> KDConfig:
    """A trainer's recipe read with the KD schema, whose keys this reads (teacher, data, train, sample.guidance_scale)
    and checks as usual; keys KD has not (train/tiny_decoder.py's `decoder` and `gan`, ...) are not read here."""
    shared = {f.name for f in dataclasses.fields(KDConfig)}
    own = sorted({str(k) for k in (_load_yaml(Path(path)).keys() if path else [])} - shared)
    schema = dataclasses.make_dataclass("Config", [(k, Any, dataclasses.field(default=None)) for k in own],
                                        bases=(KDConfig,))
    return load_config(path, overrides, schema=schema)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per cache shard (default 1000)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="stored precision (default fp32)")
    parser.add_argument("--batch-size", type=int, default=None, help="encoding batch (default train.batch_size)")
    parser.add_argument("--overwrite", action="store_true", help="replace the cache already in data.cache")
    parser.add_argument("--from-samples", action="store_true",
                        help="store the latents the teacher pipeline samples for each caption (SDXS's tiny-decoder "
                             "training data) instead of the images' VAE latents")
    parser.add_argument("--sample-steps", type=int, default=4, help="--from-samples: sampler steps (default 4)")
    parser.add_argument("--check-config", action="store_true", help=CHECK_CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", help="dotted overrides; data.cache=DIR is the output")
    args = parser.parse_args(argv)
    cfg = load_recipe(args.config, args.overrides)
    if cfg.data.cache is None:
        raise UserError("config key 'data.cache': give the output folder, e.g. data.cache=/data/cache")
    limits.check_int(args.shard_size, "--shard-size", 1, limits.MAX_IMAGES)
    limits.check_steps(args.sample_steps, "--sample-steps")
    if args.batch_size is not None:
        limits.check_int(args.batch_size, "--batch-size", 1, limits.MAX_BATCH)
    if args.from_samples and cfg.data.buckets != "none":
        raise UserError("config key 'data.buckets': --from-samples samples square latents at data.resolution; "
                        "set data.buckets=none")
    out = Path(cfg.data.cache)  # checked before anything loads, and an earlier cache is replaced only when asked
    if out.exists() and not out.is_dir():
        raise UserError(f"config key 'data.cache': '{out}' is a file; give a folder for the cache")
    if cfg.data.path is not None and same_file(out, cfg.data.path):
        raise UserError(f"config key 'data.cache': '{out}' is the data set's folder (data.path); give another folder "
                        f"for the cache")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"config key 'data.cache': '{out}' is not empty; choose a new folder or pass --overwrite "
                        f"to replace the cache in it")
    refuse_links(out, "data.cache")
    if args.check_config:
        return
    import torch

    from sdkd.data.sources.core import build_dataset
    from sdkd.data.sources.latent_cache import write_cache
    from sdkd.train.formats.fingerprint import component_fingerprint
    from sdkd.train.formats.model_files import load_parts
    from sdkd.train.models.teacher import PipelineSource
    from sdkd.train.tasks.objective import BatchEncoder
    from sdkd.train.tasks.sampled_latents import SampledLatents

    # Caption dropout and data.max_train_samples apply at train time; a webdataset is read once, in order.
    source = dataclasses.replace(cfg.data, cache=None, caption_dropout=0.0, max_train_samples=None, resampled=False,
                                 shuffle_buffer=0)
    dataset = build_dataset(source, cfg.train.seed)
    teacher = load_parts(PipelineSource.of(cfg), with_unet=args.from_samples)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher.freeze(device, torch.float32, teacher.family.models)
    encoder = (SampledLatents(teacher, args.sample_steps, cfg.sample.guidance_scale, cfg.data.resolution,
                              cfg.train.seed) if args.from_samples else BatchEncoder(teacher))
    if cfg.data.random_flip or not cfg.data.center_crop:
        print("note: random flips/crops are frozen at their epoch-0 draw in the cache", file=sys.stderr)
    start = time.perf_counter()
    manifest = write_cache(
        dataset, encoder, cfg.data.cache,
        batch_size=args.batch_size or cfg.train.batch_size, num_workers=cfg.train.num_workers,
        shard_size=args.shard_size, dtype=args.dtype, strict=cfg.data.strict, buckets=source.bucket_sizes(),
        info={"teacher": cfg.teacher, "resolution": cfg.data.resolution, "seed": cfg.train.seed,
              "weights": {name: component_fingerprint(teacher, name) for name in teacher.family.models
                          if name != "unet" or args.from_samples},
              "data": dataclasses.asdict(source),
              "latents": f"teacher samples, {args.sample_steps} steps" if args.from_samples else "VAE posterior"},
        log=lambda m: print(m, file=sys.stderr),
    )
    print(f"cached {counted(manifest['samples'], 'sample')} in {counted(len(manifest['shards']), 'shard')} "
          f"to {cfg.data.cache} ({manifest['skipped']} skipped, {time.perf_counter() - start:.1f} s)")
    recipe = f" --config {shlex.quote(args.config)}" if args.config else ""
    trainer = "train/tiny_decoder.py" if args.from_samples else "train/kd.py"
    print(f"next: accelerate launch {trainer}{recipe} data.cache={shlex.quote(str(cfg.data.cache))} ...  "
          f"# the same teacher and data.resolution")


if __name__ == "__main__":
    run_cli(main)
