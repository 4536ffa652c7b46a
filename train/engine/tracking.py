"""Metrics and image logging: OUTPUT/metrics.jsonl plus the configured trackers (wandb, tensorboard).

The JSONL file is an accelerate `GeneralTracker`, so one `accelerator.log(...)` call reaches
every tracker and only the main process writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from accelerate.tracking import GeneralTracker

from sdkd.cli.files import append_text


class JsonlTracker(GeneralTracker):
    """One JSON object per logged step, appended (a resumed run continues the same file)."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is saved as OUTPUT/config.yaml

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_text(self.path, json.dumps({"step": step, **values}) + "\n")


def tracker_list(names: list[str], output_dir: Path) -> list:
    """accelerate `log_with` for the config's tracker names; JSONL always."""
    return [JsonlTracker(output_dir / "metrics.jsonl")] + [n for n in names if n != "none"]


def init_kwargs(names: list[str], output_dir: Path) -> dict:
    # wandb's run folder goes next to the outputs; WANDB_MODE=offline needs no key.
    return {"wandb": {"dir": str(output_dir)}} if "wandb" in names else {}


def log_images(accelerator, key: str, images: list, step: int, captions: list[str] | None = None) -> None:
    """Send PIL images to every tracker that takes images, with their prompts: wandb as each image's
    caption; tensorboard images carry none, so there the prompts go in as text under KEY/prompts."""
    arrays = np.stack([np.asarray(im) for im in images])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: arrays}, step=step, dataformats="NHWC")
            if captions:  # a numbered list, in the order the image grid shows them
                tracker.log({f"{key}/prompts": "\n".join(f"{i}. {c}" for i, c in enumerate(captions, 1))}, step=step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({key: [wandb.Image(im, caption=c) for im, c in zip(images, captions or [None] * len(images))]},
                        step=step)
