"""What users name as a model, resolved one way for every command (trainers' `teacher` and `model`,
eval/sample.py, eval/evaluate.py, the demo, train/export.py, train/show_student.py): `toy` / `toy_sdxl` (the
committed trained toy teachers), a run folder (config.yaml), a `checkpoint-STEP` folder (unet/), a diffusers
pipeline folder (model_index.json), an sdkd single `.safetensors` file, or a Hugging Face hub id.

`resolve_model` only looks (no weights are read), so a command checks its models before it creates anything.
A hub id already in the local cache resolves to its cached folder without any network; one that is not cached
is looked up once (no retries) and, when the hub cannot be reached or HF_HUB_OFFLINE is set, refused in one
line suggesting a local folder. Loading each kind is train/models/teacher.py's (`toy`, diffusers folders, hub
ids) and train/formats/model_files.py's `load_source` (runs, checkpoints, single files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdkd.cli.errors import UserError, first_line

FORMS = ("a run folder (config.yaml), a checkpoint-STEP folder (unet/), a diffusers pipeline folder "
         "(model_index.json), an sdkd .safetensors file (train/export.py), toy or a Hugging Face hub id (org/name)")
PIPELINE_KINDS = ("toy", "hub", "diffusers")
"""Kinds that are a whole diffusers pipeline (local folder or hub id); the others are sdkd's own."""
# org/name as the hub spells it; a path that exists is never taken for one.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model name."""

    given: str
    """As the user wrote it (what messages and records name)."""
    kind: str
    """toy, hub, diffusers, run, checkpoint or file."""
    path: str
    """What loads it: a local path, or the hub id of a hub model not in the local cache."""

    @property
    def local(self) -> bool:
        return Path(self.path).exists()


def resolve_model(name: str | Path, what: str = "model", revision: str | None = None) -> ModelRef:
    """`name` -> its kind and where it loads from; a UserError naming `what` and `name` when it is none of
    `FORMS`, or a hub id that is neither cached nor reachable."""
    from sdkd.train.models.toy import TOY_NAMES, toy_teacher_folder

    given = str(name)
    if not given.strip():
        raise UserError(f"{what} is empty: expected {FORMS}")
    path = Path(given)
    if given in TOY_NAMES and not path.exists():
        return ModelRef(given, "toy", str(toy_teacher_folder(given)))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{what} '{given}' is not a .safetensors file: expected {FORMS}")
        return ModelRef(given, "file", given)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return ModelRef(given, "diffusers", given)
        # A checkpoint holds a U-Net but never a VAE: a pipeline folder that lost its model_index.json is no checkpoint.
        if ((path / "unet").is_dir() or (path / "unet_ema").is_dir()) and not (path / "vae").exists():
            return ModelRef(given, "checkpoint", given)
        if (path / "config.yaml").is_file():
            return ModelRef(given, "run", given)
        raise UserError(f"{what} '{given}' is not {FORMS}")
    if path.exists() or not HUB_ID.match(given):
        raise UserError(f"{what} '{given}' not found: expected {FORMS}")
    return ModelRef(given, "hub", _hub(given, what, revision))


def _hub(repo: str, what: str, revision: str | None) -> str:
    """The cached snapshot folder of hub model `repo`, else `repo` itself once one look-up found it on the hub."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    missing = f"{what} '{repo}': not a local file or folder, and"
    advice = "download it once where there is a network, or give a local diffusers folder"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{missing} not in the Hugging Face cache (HF_HUB_OFFLINE is set, so the hub is not asked); "
                        f"{advice}")
    try:  # one request, no retries: the loaders download only once it answered
        HfApi().model_info(repo, revision=revision, timeout=10)
    except GatedRepoError:
        raise UserError(f"{what} '{repo}' is gated on the Hugging Face hub: accept its terms on its page and log "
                        f"in (hf auth login)") from None
    except RevisionNotFoundError:
        raise UserError(f"{what} '{repo}': the hub has no revision '{revision}'") from None
    except RepositoryNotFoundError:
        raise UserError(f"{what} '{repo}': no such local file or folder, nor model on the Hugging Face hub") from None
    except HfHubHTTPError as err:
        raise UserError(f"{what} '{repo}': the Hugging Face hub answered {first_line(err)}") from None
    except Exception:  # noqa: BLE001 - the HTTP client's connection errors: their classes vary with its version
        raise UserError(f"{missing} the Hugging Face hub cannot be reached (offline?); {advice}") from None
    return repo
