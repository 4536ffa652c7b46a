"""LoRA adapters (peft) on a student: adding them, the diffusers file, layout checks, checkpoints, sd.cpp.

- `add_adapters`: peft LoRA on the U-Net's (and optionally the text encoders') target modules; every
  target must match a module of this model, else one line naming it and the model's layout.
- `save_lora`: `pytorch_lora_weights.safetensors` exactly as diffusers writes it (the `save_lora_weights` of
  the U-Net's model family's pipeline class, train/models/families.py: `unet.*` keys and, per adapted text
  encoder, keys prefixed with its component name; peft adapter configs in the `lora_adapter_metadata`),
  plus sdkd metadata: the base model, its U-Net layout and config. Plain diffusers
  `pipe.load_lora_weights(folder)` and sdkd's pipeline (`--lora FILE`) load it.
- `lora_family`: the model family a LoRA was trained on (recorded in its metadata), its tensors checked to
  adapt only that family's models (an SDXL LoRA's `text_encoder_2.*` tensors have no place in an SD-1.x one);
  train/convert_lora.py checks a file with it before converting.
- `check_lora`: before loading, the LoRA must be of the target model's family (else one line naming both
  families), and every adapted module must exist in the target model with the LoRA's widths: else
  `UserError` naming the first module that does not fit and both layouts (diffusers would skip or only
  warn).
- `LoraState`: what a LoRA run's checkpoints hold (the adapter file and the EMA of the adapter), so
  `Checkpointer` and `resume` work unchanged.
- `to_sdcpp`: the same LoRA for stable-diffusion.cpp: kohya names (`lora_unet_*`; `lora_te_*`, or
  `lora_te1_*`, `lora_te2_*` for SDXL's two text encoders) over the teacher-slot LDM numbering that sdkd's
  `--target sdcpp` single files use (`ldm_layout`), `lora_down` /
  `lora_up` / `alpha` tensors (sd.cpp scales by alpha / rank; without `alpha` it would use 1), for families
  the single file has a place for; the command is train/convert_lora.py.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sdkd.cli.errors import UserError, first_line
from sdkd.cli.files import save_file
from sdkd.train.engine import console
from sdkd.train.engine.checkpoints import TensorState, load_ema, save_ema
from sdkd.train.formats import ldm_layout
from sdkd.train.formats.lora_config import LoraSection
from sdkd.train.models.families import ModelFamily, family_of, registered_families

LORA_FILE = "pytorch_lora_weights.safetensors"
SDCPP_FILE = "lora_sdcpp.safetensors"
EMA_FILE = "lora_ema.safetensors"
META = "sdkd."
# diffusers / peft / kohya suffixes of a LoRA tensor -> (down or up)
_SUFFIX = re.compile(r"\.(lora\.down|lora\.up|lora_A|lora_B|lora_linear_layer\.down|lora_linear_layer\.up|"
                     r"lora_down|lora_up)(\.[A-Za-z_]+)?\.weight$")


# ---------------------------------------------------------------------------------------------
# Adapters


def layout_of(unet) -> str:
    return ldm_layout.unet_layout(dict(unet.config))


def _check_targets(model, targets: list[str], key: str, what: str) -> None:
    names = [n for n, _ in model.named_modules()]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            example = next((n for n in reversed(names) if n.count(".") >= 3), names[-1])
            raise UserError(f"config key '{key}': no module '{target}' in {what}; module names there look like "
                            f"'{example}'")


def _parts(unet) -> tuple[str, ...]:
    """The models of the U-Net's family a LoRA file may adapt, by component name: the U-Net first."""
    family = family_of(unet.config)
    return ("unet", *family.text_encoders)


def add_adapters(unet, text_encoders: dict | None, cfg: LoraSection, seed: int = 0) -> None:
    """Put a peft LoRA ("default" adapter, gaussian A, zero B: the model is unchanged) on the targets of the
    U-Net and of `text_encoders` (by component name)."""
    from peft import LoraConfig

    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    _check_targets(unet, cfg.target_modules, "lora.target_modules", f"this U-Net (layout {layout_of(unet)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=alpha, lora_dropout=cfg.dropout,
                                    init_lora_weights="gaussian", target_modules=list(cfg.target_modules)))
        for name, encoder in (text_encoders or {}).items():
            _check_targets(encoder, cfg.text_encoder_target_modules, "lora.text_encoder_target_modules",
                           f"the text encoder '{name}'" if len(text_encoders) > 1 else "the text encoder")
            encoder.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=alpha, lora_dropout=cfg.dropout,
                                           init_lora_weights="gaussian",
                                           target_modules=list(cfg.text_encoder_target_modules)))


# ---------------------------------------------------------------------------------------------
# The diffusers file


def _adapter_layers(model) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_lora(folder: str | Path, unet, text_encoders: dict | None = None, base: str | None = None) -> Path:
    """Write FOLDER/pytorch_lora_weights.safetensors (diffusers format) with sdkd metadata; returns the file.
    `text_encoders`: the adapted text encoders by component name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapted = {"unet": unet, **(text_encoders or {})}
    family_of(unet.config).pipeline_class.save_lora_weights(
        folder, safe_serialization=True, **{f"{name}_lora_layers": _adapter_layers(m) for name, m in adapted.items()},
        **{f"{name}_lora_adapter_metadata": m.peft_config["default"].to_dict() for name, m in adapted.items()})
    file = folder / LORA_FILE
    # diffusers' metadata (the adapter configs) stays; ours says which model the LoRA fits.
    tensors, meta = load_file(file), read_metadata(file)
    meta |= {META + "base_model": str(base or ""), META + "layout": layout_of(unet),
             META + "unet_config": json.dumps(dict(unet.config), default=list)}
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, file)
    return file


def read_metadata(file: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"LoRA '{file}' is not a readable .safetensors file ({err})") from None


def lora_file(path: str | Path) -> Path:
    """The LoRA file `path` names: itself, or FOLDER/pytorch_lora_weights.safetensors."""
    path = Path(path)
    return path / LORA_FILE if path.is_dir() else path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file, or of FOLDER/pytorch_lora_weights.safetensors."""
    path = Path(path)
    file = lora_file(path)
    if not file.is_file():
        raise UserError(f"LoRA '{path}' not found (expected a .safetensors file or a folder with {LORA_FILE})")
    meta = read_metadata(file)
    with safe_open(str(file), framework="pt") as f:  # the names only: a full model is not loaded to be refused
        keys = list(f.keys())
    if not any(_SUFFIX.search(key) for key in keys):
        what = f"a full model ({len(keys)} tensors, no LoRA down/up pair)" if keys else "no tensors"
        raise UserError(f"'{file}' holds {what}, not a LoRA: give a LoRA file, such as OUTPUT/{LORA_FILE} of "
                        f"train/lora.py")
    return load_file(file), meta


def _module_name(key: str, parts: tuple[str, ...]) -> tuple[str, str, bool] | None:
    """'unet.down_blocks.0....to_q.lora.down.weight' -> ('unet', 'down_blocks.0....to_q', is_down), for a key of
    one of `parts` (component names)."""
    for part in parts:
        prefix = part + "."
        if key.startswith(prefix) and (m := _SUFFIX.search(key)):
            name = key[len(prefix):m.start()].replace(".processor.", ".")
            name = re.sub(r"\.to_(q|k|v|out)_lora$", r".to_\1", name)  # old attn-processor LoRA names
            return part, name, m[1] in ("lora.down", "lora_A", "lora_linear_layer.down", "lora_down")
    return None


def _find(model, name: str):
    for candidate in (name, name.removeprefix("text_model.")):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _adapted_parts(state: dict) -> set[str]:
    """The component names (of any registered family) whose models a LoRA's tensors adapt."""
    known = {name for family in registered_families() for name in family.models}
    return {key.split(".", 1)[0] for key in state if _SUFFIX.search(key)} & known


def lora_family(state: dict, meta: dict, source: str = "LoRA") -> ModelFamily | None:
    """The model family a LoRA was trained on, from the U-Net config sdkd records in it (None without one), after
    checking that its tensors adapt only models that family has."""
    if META + "unet_config" not in meta:
        return None
    family = family_of(json.loads(meta[META + "unet_config"]), f"LoRA '{source}'")
    foreign = sorted(_adapted_parts(state) - {"unet", *family.text_encoders})
    if foreign:
        raise UserError(f"LoRA '{source}' records a U-Net of model family '{family.name}', but adapts "
                        f"'{foreign[0]}', which that family does not have: its tensors and its metadata disagree")
    return family


def _check_family(state: dict, unet, source: str, meta: dict) -> None:
    """A LoRA of another model family is refused before its modules are looked for (SD-1.x and SDXL U-Nets share
    many module names, and at some widths a module would fit)."""
    here = family_of(unet.config)
    theirs = lora_family(state, meta, source)
    if theirs is not None and theirs is not here:
        raise UserError(f"LoRA '{source}' was trained on a model of family '{theirs.name}', this model is of family "
                        f"'{here.name}': a LoRA applies only to models of its own family")
    foreign = sorted(_adapted_parts(state) - set(_parts(unet)))
    if foreign:  # a LoRA without sdkd metadata: a text encoder this family lacks tells
        raise UserError(f"LoRA '{source}' adapts '{foreign[0]}', which a model of family '{here.name}' does not "
                        f"have: it was trained on another model family")


# The U-Net config keys that fix its block structure: a LoRA fits only the structure it was trained on.
_STRUCTURE_KEYS = ("down_block_types", "up_block_types", "mid_block_type", "layers_per_block", "block_out_channels",
                   "transformer_layers_per_block", "only_cross_attention", "cross_attention_dim")


def _structure(config) -> str:
    return json.dumps([config.get(key) for key in _STRUCTURE_KEYS], default=list)


def check_lora(state: dict, unet, text_encoders: dict | None = None, source: str = "LoRA",
               meta: dict | None = None) -> None:
    """Raise UserError unless the LoRA is of `unet`'s model family and every adapted module exists in `unet` /
    `text_encoders` (by component name) with the LoRA's widths."""
    meta = meta or {}
    _check_family(state, unet, source, meta)
    theirs = meta.get(META + "layout")
    base = meta.get(META + "base_model")
    made_for = (f"the LoRA was trained on a '{theirs}' U-Net" + (f" (base model {base})" if base else "")
                if theirs else "the LoRA was trained on another model")
    here = layout_of(unet)
    models, parts = {"unet": unet, **(text_encoders or {})}, _parts(unet)
    targets = []  # (module name, what, module, tensor, is_down): missing modules are named before wrong widths
    for key, t in state.items():
        parsed = _module_name(key, parts)
        if parsed is None:
            continue
        part, name, down = parsed
        model = models.get(part)
        encoder = "the text encoder" + (f" '{part}'" if len(parts) > 2 else "")  # named where a family has several
        what = f"this U-Net (layout '{here}')" if part == "unet" else encoder.replace("the ", "this ", 1)
        if model is None:
            raise UserError(f"LoRA '{source}' adapts {encoder}, but no text encoder was given to load it into")
        module = _find(model, name)
        if module is None:
            raise UserError(f"LoRA '{source}' does not fit this model: it adapts '{name}', which {what} does not "
                            f"have; {made_for}. Load it into that model, or train a LoRA on this one")
        targets.append((name, what, getattr(module, "base_layer", module), t, down))  # base_layer: peft-adapted
    found = bool(targets)
    for name, what, module, t, down in targets:
        width = getattr(module, "in_features", getattr(module, "in_channels", None))
        out = getattr(module, "out_features", getattr(module, "out_channels", None))
        have, expect = (t.shape[1], width) if down else (t.shape[0], out)
        if expect is not None and have != expect:
            side = "inputs" if down else "outputs"
            raise UserError(f"LoRA '{source}' does not fit this model: '{name}' has {expect} {side} in {what}, "
                            f"{have} in the LoRA; {made_for}. Load it into that model, or train a LoRA on this one")
    if META + "unet_config" in meta and _structure(json.loads(meta[META + "unet_config"])) != _structure(unet.config):
        # Every module fits, which can happen across layouts (a bk_small LoRA's modules all exist in the teacher, at
        # other depths): the recorded U-Net's block structure must be this one's.
        this = f"'{here}'" + (" of another block structure" if here == theirs else "")
        raise UserError(f"LoRA '{source}' does not fit this model: {made_for}, this U-Net's layout is {this}. Load "
                        f"it into that model, or train a LoRA on this one")
    if not found:
        raise UserError(f"LoRA '{source}' holds no LoRA tensors in diffusers/peft naming ('unet.*.lora.down.weight')")


def load_lora_state(path: str | Path, unet, text_encoders: dict | None = None) -> None:
    """Set the "default" peft adapter of `unet` (and of `text_encoders`, by component name) from a LoRA file,
    after `check_lora`."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    state, meta = read_lora(path)
    check_lora(state, unet, text_encoders, str(path), meta)
    text_encoders = text_encoders or {}
    for name in _parts(unet):
        model = unet if name == "unet" else text_encoders.get(name)
        convert = convert_unet_state_dict_to_peft if name == "unet" else convert_state_dict_to_peft
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if model is None or not part:
            continue
        result = set_peft_model_state_dict(model, convert(part), adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise UserError(f"LoRA '{path}': {len(unexpected)} tensors have no place in the model, "
                            f"e.g. {unexpected[0]}")


def load_lora(pipe, path: str | Path, scale: float = 1.0) -> None:
    """A diffusers pipeline + a LoRA file, checked first (`check_lora`), then loaded and fused by diffusers."""
    state, meta = read_lora(path)
    text_encoders = {name: pipe.components[name] for name in _parts(pipe.unet)[1:]}
    check_lora(state, pipe.unet, text_encoders, str(path), meta)
    file = lora_file(path)
    # diffusers' load_lora_weights tries every text encoder and warns for each the file has no tensors for:
    # a U-Net LoRA is whole without them (check_lora has matched the file against this model).
    absent = "|".join(re.escape(name) for name in text_encoders if not any(k.startswith(name + ".") for k in state))
    quiet = (console.dropping("diffusers.loaders.lora_base",
                              rf"^No LoRA keys associated to \w+ found with the prefix='({absent})'\.")
             if absent else nullcontext())
    try:
        with quiet:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="lora")
        pipe.fuse_lora(lora_scale=scale)
    except Exception as err:  # noqa: BLE001 - diffusers/peft raise many kinds for a file they cannot apply
        raise UserError(f"LoRA '{path}' could not be applied ({first_line(err)})") from None


# ---------------------------------------------------------------------------------------------
# Checkpoints


class LoraState(TensorState):
    """A LoRA run's checkpoint: the adapter (pytorch_lora_weights.safetensors) and its EMA; never the U-Net.
    `text_encoders`: the adapted text encoders by component name."""

    shardable = False

    def __init__(self, unet, text_encoders: dict | None = None, base: str | None = None):
        super().__init__(unet)
        self.unet, self.text_encoders, self.base = unet, text_encoders or {}, base

    def named_ema_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        adapted = {"unet": self.unet, **self.text_encoders}
        return [(f"{part}.{n}", p) for part, model in adapted.items() for n, p in model.named_parameters()
                if p.requires_grad]

    def save(self, folder: Path, ema=None) -> None:
        save_lora(folder, self.unet, self.text_encoders, self.base)
        if ema is not None:
            save_ema(ema, self.named_ema_parameters(), folder / EMA_FILE)

    def load(self, folder: Path, ema=None, device=None) -> None:
        load_lora_state(folder / LORA_FILE, self.unet, self.text_encoders)
        if ema is not None:
            load_ema(ema, self.named_ema_parameters(), folder / EMA_FILE, device)


# ---------------------------------------------------------------------------------------------
# stable-diffusion.cpp


def _alphas(meta: dict, parts: tuple[str, ...]) -> dict[str, float]:
    """Per part, the scale numerator: lora_alpha from diffusers' adapter metadata (else the rank: scale 1)."""
    adapter = json.loads(meta.get("lora_adapter_metadata") or "{}")
    return {part: adapter.get(f"{part}.lora_alpha") for part in parts}


def to_sdcpp(state: dict, meta: dict, source: str = "LoRA") -> dict[str, torch.Tensor]:
    """A diffusers-format sdkd LoRA -> kohya names over the teacher-slot LDM numbering, with alpha tensors."""
    if META + "unet_config" not in meta:
        raise UserError(f"LoRA '{source}' has no sdkd metadata (its U-Net config), so its LDM names are unknown; "
                        f"convert a LoRA written by train/lora.py")
    unet_config = json.loads(meta[META + "unet_config"])
    family = family_of(unet_config, f"LoRA '{source}'")
    if not family.single_file:
        raise ldm_layout.UnsupportedLayout(f"LoRA '{source}' is for a U-Net of model family '{family.name}', which "
                                           f"the LDM single file (and so stable-diffusion.cpp) has no layout for")
    parts = ("unet", *family.text_encoders)
    layout = ldm_layout.unet_layout(unet_config)
    if not ldm_layout.sdcpp_runs(unet_config):
        raise ldm_layout.UnsupportedLayout(
            f"LoRA '{source}' is for a '{layout}' {family.name.upper()} U-Net, which stable-diffusion.cpp cannot run; "
            f"layouts that work there: {ldm_layout.SDCPP_WORKING}")
    # kohya's text-encoder prefixes: lora_te_ for a family's only text encoder, else lora_te1_, lora_te2_, ...
    te_prefix = {name: "lora_te_" if len(parts) == 2 else f"lora_te{i}_" for i, name in enumerate(parts[1:], 1)}
    alphas = _alphas(meta, parts)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        parsed = _module_name(key, parts)
        if parsed is None:
            continue
        part, name, down = parsed
        if part == "unet":
            ldm = ldm_layout.unet_name(name + ".weight", unet_config, "sdcpp").removesuffix(".weight")
            stem = "lora_unet_" + ldm.replace(".", "_")
        else:
            stem = te_prefix[part] + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
        out[f"{stem}.{'lora_down' if down else 'lora_up'}.weight"] = t.detach().cpu().contiguous()
        if down:
            alpha = alphas.get(part) or t.shape[0]
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def export_sdcpp(lora: str | Path, out: str | Path) -> Path:
    state, meta = read_lora(lora)
    tensors = to_sdcpp(state, meta, str(lora))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt", META + "base_model": meta.get(META + "base_model", ""),
                                           META + "layout": meta.get(META + "layout", "")})
    return out
