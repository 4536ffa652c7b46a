"""Loading a pipeline's parts (train/models/names.py: toy, a hub id, a diffusers folder; runs, checkpoints and
single files through train/formats/model_files.py `load_parts`): the teacher, a model to fine-tune, a student to
sample or export.

Only the classes the pipeline's model family has are built (train/models/families.py: the family comes from the
U-Net's config), whatever a folder's model_index.json names: its VAE's config may say AutoencoderKL or
AutoencoderTiny, its scheduler's any diffusers scheduler. Weights load from safetensors unless pickle is
allowed by name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

from sdkd.cli.errors import UserError, first_line
from sdkd.train.engine.frozen import freeze
from sdkd.train.models.families import ModelFamily, family_of
from sdkd.train.models.names import PIPELINE_KINDS, ModelRef, resolve_model


@dataclass
class PipelineParts:
    """The components of a pipeline a trainer needs, by their family's names (train/models/families.py). The
    U-Net may be left out, and so may the VAE, text encoders and tokenizers (a run from a latent cache: their
    entries are None); `vae_config` and `family` are kept either way."""

    components: dict[str, Any]
    family: ModelFamily | None = None
    """Whose components they are; taken from the U-Net's config when not given."""
    vae_config: Any = None
    """The VAE's config (a dict-like); taken from the VAE when not given."""
    source: str = ""
    """Where they were loaded from: a local folder, or a hub id with its revision (what train/formats/fingerprint.py
    `component_fingerprint` hashes when there is no folder)."""
    folder: Path | None = None
    """The local folder of their files (a hub id's cached snapshot); None when unknown."""

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = family_of(self.unet.config)
        if self.vae_config is None:
            self.vae_config = self.vae.config

    @classmethod
    def of(cls, pipe: DiffusionPipeline) -> "PipelineParts":
        """A diffusers pipeline's components, as its U-Net's family names them."""
        family = family_of(pipe.unet.config)
        return cls({name: getattr(pipe, name) for name in family.components}, family)

    @property
    def unet(self) -> UNet2DConditionModel | None:
        return self.components["unet"]

    @property
    def vae(self) -> AutoencoderKL | AutoencoderTiny | None:
        return self.components["vae"]

    @property
    def scheduler(self) -> DDPMScheduler:
        return self.components["scheduler"]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def has_encoders(self) -> bool:
        return self.vae is not None

    @property
    def frozen(self) -> dict[str, torch.nn.Module | None]:
        """The VAE and the text encoders by name: the models no trainer trains, which a run from a latent
        cache leaves out (None)."""
        return {name: self.components[name] for name in self.family.frozen}

    def freeze(self, device: torch.device, mixed: torch.dtype, names: tuple[str, ...] | None = None) -> None:
        """Freeze the models `names` (default: `frozen`'s) on `device`, each in the dtype its family gives it
        under mixed precision `mixed`; those not loaded are passed over."""
        for name in self.family.frozen if names is None else names:
            if self.components[name] is not None:
                freeze(self.components[name], device, self.family.dtype(name, mixed))


@dataclass(frozen=True)
class PipelineSource:
    """A model to load (any name train/models/names.py resolves), with the hub `revision` (branch, tag or
    commit) and weight `variant` (fp16: the `*.fp16.safetensors` files) of diffusers' `from_pretrained`."""

    path: str
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    """Load pickle weights (.bin) where there are no safetensors; pickle can run code when loaded."""

    @classmethod
    def of(cls, cfg, key: str = "teacher") -> "PipelineSource":
        """The config's `teacher` or `model`, with its `KEY_revision`, `KEY_variant` and `allow_pickle`."""
        return cls(getattr(cfg, key), getattr(cfg, f"{key}_revision"), getattr(cfg, f"{key}_variant"),
                   cfg.allow_pickle)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


def scheduler_class(name: str, where: str) -> type:
    """The diffusers scheduler class a config or file names; nothing else is built from a name."""
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UserError(f"{where} names {name!r}, which is no diffusers scheduler")
    return cls


def vae_class(name: str, where: str) -> type:
    if name not in VAE_CLASSES:
        raise UserError(f"{where} names {name!r}; expected a VAE class: {', '.join(VAE_CLASSES)}")
    return VAE_CLASSES[name]


def safe_weights(what: str, allow_pickle: bool, *folders: Path) -> dict:
    """`from_pretrained` arguments that load safetensors only, unless the user allowed pickle by name (pickle
    can run code when loaded). A local folder with pickle weights only is refused here, in one line naming
    it; a hub id is refused by the loader itself (use_safetensors=True)."""
    if allow_pickle:
        return {"use_safetensors": None}
    for folder in folders:
        files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
        pickled = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
        if pickled and not any(f.suffix == ".safetensors" for f in files):
            raise UserError(f"{what} '{folder}': weights only as pickle ({', '.join(pickled)}), which can run code "
                            f"when loaded; convert them to safetensors, "
                            f"or set allow_pickle=true if you trust the files")
    return {"use_safetensors": True}


def _class_name(config_file: Path, what: str) -> str | None:
    """`_class_name` of a local part's config, if there is one."""
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{what} '{config_file}' is unreadable ({first_line(err)})") from None


def resolve(src: PipelineSource, what: str, pipeline: bool = False) -> ModelRef:
    """`src` resolved (train/models/names.py); a weight variant is a diffusers folder's or a hub model's only.
    `pipeline`: only those kinds (what this module loads; train/formats/model_files.py `load_parts` loads every
    kind)."""
    ref = resolve_model(src.path, what, src.revision)
    if pipeline and ref.kind not in PIPELINE_KINDS:
        raise UserError(f"{what} '{src.path}' is a {ref.kind}, not a diffusers pipeline (load it with "
                        f"train/formats/model_files.py load_parts)")
    if src.variant and ref.kind not in PIPELINE_KINDS:
        raise UserError(f"{what}_variant={src.variant}: only a diffusers folder or a hub model has weight variants; "
                        f"{what} '{src.path}' is a {ref.kind}")
    return ref


def _snapshot(repo: str, revision: str | None) -> Path | None:
    """The local folder of a hub pipeline already downloaded (from_pretrained has just fetched it), else None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure leaves the hub id as the only name of its weights
        return None


def load_teacher(source: str | PipelineSource, with_unet: bool = True, with_encoders: bool = True,
                 what: str = "teacher") -> PipelineParts:
    """`source`: a pipeline (train/models/names.py: toy, a hub id, cached or downloaded, a diffusers folder), as a
    path or a `PipelineSource`; train/formats/model_files.py `load_parts` takes runs, checkpoints and single files
    too.

    `with_encoders=False` leaves out the VAE, text encoders and tokenizers (only the VAE's config is read).
    The scheduler is the family's training one (DDPM) built from the folder's scheduler config, whatever class it
    names: sdkd's exports ship DPM-Solver++, whose config keeps the training betas and prediction type.
    `what` names the pipeline in errors (the fine-tune and LoRA trainers load their `model` with it)."""
    src = source if isinstance(source, PipelineSource) else PipelineSource(source)
    ref = resolve(src, what, pipeline=True)
    source = ref.path
    local = Path(source)
    if local.exists() and not (local / "model_index.json").is_file():  # a partly cached hub model
        raise UserError(f"{what} '{ref.given}': '{local}' has no model_index.json (expected a diffusers pipeline "
                        f"folder)")
    try:
        kw = dict(local_files_only=local.exists(), revision=src.revision)
        # The U-Net's config says which family, and so which components, there are.
        family = family_of(UNet2DConditionModel.load_config(source, subfolder="unet", **kw), f"{what} '{source}'")
        names = ("unet",) * with_unet + family.encoders * with_encoders + ("scheduler",)
        safe = safe_weights(what, src.allow_pickle, *(local / name for name in names
                                                      if name in family.models and local.exists()))
        vae_name = _class_name(local / "vae" / "config.json", what)
        vae_cls = vae_class(vae_name, f"{what} '{local / 'vae'}'") if vae_name else family.components["vae"].cls
        # Tokenizers, schedulers and configs have no variants; safetensors only unless allowed.
        weights = dict(kw, variant=src.variant, **safe)
        components = dict.fromkeys(family.components)
        for name in names:
            cls = vae_cls if name == "vae" else family.components[name].cls
            components[name] = cls.from_pretrained(source, subfolder=name, **(weights if name in family.models else kw))
        vae_config = None if with_encoders else vae_cls.load_config(source, subfolder="vae", **kw)
        return PipelineParts(components, family, vae_config, f"{source}@{src.revision or 'main'}",
                             local if local.exists() else _snapshot(source, src.revision))
    except (OSError, ValueError, RuntimeError) as err:
        variant = f" ({what}_variant={src.variant})" if src.variant else ""
        raise UserError(f"{what} '{source}'{variant} could not be loaded: {first_line(err)}") from None


def load_pipeline(source: str | PipelineSource, what: str = "model") -> DiffusionPipeline:
    """A whole pipeline of its family's class (a student folder, a teacher) with its own scheduler class, for
    sampling and export."""
    src = source if isinstance(source, PipelineSource) else PipelineSource(source)
    ref = resolve(src, what, pipeline=True)
    src = PipelineSource(ref.path, src.revision, src.variant, src.allow_pickle)
    parts = load_teacher(src, what=what)
    local = Path(src.path)
    name = _class_name(local / "scheduler" / "scheduler_config.json", what)
    cls = scheduler_class(name, f"{what} '{local / 'scheduler'}'") if name else DDPMScheduler
    try:
        scheduler = cls.from_pretrained(src.path, subfolder="scheduler", local_files_only=local.exists(),
                                        revision=src.revision)
    except (OSError, ValueError) as err:
        raise UserError(f"{what} '{src.path}': its scheduler could not be loaded: {first_line(err)}") from None
    return parts.family.pipeline(parts, parts.unet, scheduler)
