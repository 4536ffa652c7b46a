"""Typed configuration: YAML recipes merged into dataclasses, dotted overrides, checks, --help.

`RunConfig` is what every run has, whatever it trains: its folder (output_dir, resume, overwrite), training
(train), optimizer (optim), EMA, data, trackers (log). Each trainer's schema is a `RunConfig` with its own
keys and sections added (train/tasks/*_config.py); its script declares it as `SCHEMA` and loads it with
`load_trainer_config`. A recipe in `configs/` sets what differs from the defaults; `key=value` arguments after
`--config` override it. Unknown keys, wrong types, values outside a `Choice` and missing required values
raise `ConfigError` with the dotted key as the YAML is merged; then `check_config` calls each section's
`check` (data/sources/config.py's `Section`), which names the key of an out-of-range value or impossible
combination.
"""

from __future__ import annotations

import argparse
import ast
import enum
import functools
import importlib.util
import inspect
import json
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from enum import auto
from pathlib import Path
from typing import Any, Optional, Sequence, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdkd.cli import limits
from sdkd.cli.errors import ConfigError, UserError, first_line, require
from sdkd.cli.files import write_text
from sdkd.data.sources.config import Choice, DataConfig, Section, expected_one_of

try:
    from omegaconf._yaml import get_yaml_loader  # omegaconf >= 2.4
except ImportError:
    from omegaconf._utils import get_yaml_loader  # omegaconf 2.3


# ---------------------------------------------------------------------------------------------
# What every run has


class MixedPrecision(Choice):
    no = auto()
    fp16 = auto()
    bf16 = auto()


class AdamWImplementation(Choice):
    # enum.auto: the member `auto` shadows the bare name in the rest of this class body.
    auto = enum.auto()
    fused = enum.auto()
    foreach = enum.auto()
    loop = enum.auto()


class OptimizerName(Choice):
    adamw = auto()
    adamw_8bit = auto()


class LRScheduler(Choice):
    """diffusers.optimization.SchedulerType's names (a test pins them: this module imports no diffusers);
    piecewise_constant is left out: it needs step rules this config does not carry."""

    constant = auto()
    constant_with_warmup = auto()
    linear = auto()
    cosine = auto()
    cosine_with_restarts = auto()
    polynomial = auto()


class Tracker(Choice):
    wandb = auto()
    tensorboard = auto()
    none = auto()


@dataclass
class TrainConfig(Section):
    max_steps: Optional[int] = None
    """Optimizer steps to train for; null: train.num_epochs' worth when that is set, else 100."""
    num_epochs: Optional[int] = None
    """Train for this many epochs instead of train.max_steps (set one of them): max_steps =
    num_epochs * ceil(batches per process and epoch / grad_accum), as diffusers derives it."""
    seed: int = 0
    """Seed for weights' noise, timesteps, data order and augmentation."""
    batch_size: int = 4
    """Samples per process per micro-step: the global batch is batch_size x grad_accum x processes."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    mixed_precision: MixedPrecision = MixedPrecision.no
    """Autocast for the student (no: float32); frozen models are cast to it."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    checkpoint_every: int = 500
    """Write OUTPUT/checkpoint-STEP every this many steps (0: only at the end)."""
    checkpoints_total_limit: Optional[int] = 3
    """Keep at most this many checkpoints (oldest removed); null keeps all."""
    sample_every: int = 500
    """Save a sample grid every this many steps (0: never during training)."""
    log_every: int = 1
    """Write a metrics line every this many steps."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.max_steps is None or self.max_steps > 0, f"{at}.max_steps", "must be > 0 or null")
        require(self.num_epochs is None or self.num_epochs > 0, f"{at}.num_epochs", "must be > 0 or null")
        require(self.max_steps is None or self.num_epochs is None, f"{at}.num_epochs",
                f"{at}.max_steps and {at}.num_epochs are both set: set one, the other to null")
        require(self.batch_size > 0, f"{at}.batch_size", "must be > 0")
        require(self.grad_accum > 0, f"{at}.grad_accum", "must be > 0")
        require(self.checkpoint_every >= 0, f"{at}.checkpoint_every", "must be >= 0")
        require(self.sample_every >= 0, f"{at}.sample_every", "must be >= 0")
        require(self.log_every > 0, f"{at}.log_every", "must be > 0")
        require(self.checkpoints_total_limit is None or self.checkpoints_total_limit > 0,
                f"{at}.checkpoints_total_limit", "must be > 0 or null")
        require(self.max_grad_norm >= 0, f"{at}.max_grad_norm", "must be >= 0 (0 disables clipping)")
        require(self.seed >= 0, f"{at}.seed", "must be >= 0")
        require(self.num_workers >= 0, f"{at}.num_workers", "must be >= 0")


@dataclass
class OptimConfig(Section):
    name: OptimizerName = OptimizerName.adamw
    """adamw: torch's AdamW (fp32 states, 8 bytes per trained parameter); adamw_8bit: bitsandbytes' AdamW8bit
    (8-bit block-quantised states, 2 bytes per parameter), CUDA only and needs `pip install bitsandbytes`."""
    lr: float = 5e-5
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    implementation: AdamWImplementation = AdamWImplementation.auto
    """torch AdamW's kernel (optim.name=adamw); auto: fused where supported, else foreach."""
    lr_scheduler: LRScheduler = LRScheduler.constant
    """diffusers' learning-rate schedule of that name."""
    warmup_steps: int = 0
    """Linear warm-up steps (counted in optimizer steps)."""

    def check(self, at: str) -> None:
        super().check(at)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{at}.betas",
                "expected two numbers in [0, 1)")
        require(self.lr > 0, f"{at}.lr", "must be > 0")
        require(self.weight_decay >= 0, f"{at}.weight_decay", "must be >= 0")
        require(self.eps > 0, f"{at}.eps", "must be > 0")
        require(self.warmup_steps >= 0, f"{at}.warmup_steps", "must be >= 0")
        require(self.name == "adamw" or self.implementation == "auto", f"{at}.implementation",
                f"chooses torch AdamW's kernel: leave it at auto with {at}.name={self.name}")
        # Checked here, before any process starts or a model loads (launch.sh's --check-config); find_spec
        # does not import it.
        require(self.name != "adamw_8bit" or importlib.util.find_spec("bitsandbytes") is not None, f"{at}.name",
                "adamw_8bit needs bitsandbytes, which is not installed (pip install bitsandbytes; CUDA only), "
                "or use adamw")


@dataclass
class EMAConfig(Section):
    enabled: bool = False
    """Keep an exponential moving average of the student, initialised from it after weight copy."""
    decay: float = 0.9999
    """Maximum EMA decay (diffusers EMAModel, warm-up ramp (1+t)/(10+t))."""

    def check(self, at: str) -> None:
        super().check(at)
        require(0 <= self.decay <= 1, f"{at}.decay", "must be in [0, 1]")


@dataclass
class LogConfig(Section):
    trackers: list[Tracker] = field(default_factory=lambda: [Tracker.tensorboard])
    """Trackers besides OUTPUT/metrics.jsonl; [] or [none] for none."""
    project: str = "sdkd"
    """Tracker project name."""


@dataclass
class EvalConfig(Section):
    """The `eval` section of a trainer whose task evaluates in the loop (`Task.evaluate`); a trainer adds what
    it measures on."""

    every: int = 0
    """Evaluate every this many steps, at step 0 of a new run and at the last step; 0: never."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.every >= 0, f"{at}.every", "must be >= 0 (0: never)")


@dataclass
class RunConfig(Section):
    """What every run has: what the loop (train/engine/loop.py), the run folder (run_folder.py) and every
    trainer's task read."""

    output_dir: str = MISSING
    """Run folder: config.yaml, metrics.jsonl, checkpoint-STEP/, samples/ and what the run exports."""
    resume: Optional[str] = None
    """latest (the newest checkpoint in output_dir, if any; stops with one line if its contents are incomplete),
    latest_complete (the newest whose contents are complete, naming newer broken ones it passes over) or a
    checkpoint path."""
    overwrite: bool = False
    """Replace the run already in output_dir (its files are removed once the new run has loaded); without
    it, or resume, a non-empty output_dir stops the run."""
    allow_pickle: bool = False
    """Load pickle weights (.bin, .ckpt) where a model the run loads has no safetensors. Pickle can run code
    when loaded: set it only for files you trust (diffusers' own conversion script makes safetensors)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def check_inputs(self) -> None:
        """What the run reads, checked before its output folder is made without reading it (run_folder.py): here the
        data's path; a trainer's config adds its models (train/tasks)."""
        from sdkd.data.sources.core import check_source

        check_source(self.data)

    def check(self, at: str) -> None:
        super().check(at)
        require(not (self.overwrite and self.resume is not None), "overwrite",
                "overwrite=true replaces the run in output_dir; resume continues it: set one of them")


def resolve_max_steps(t: TrainConfig, batches_per_epoch: int) -> int:
    """The run's optimizer steps: train.max_steps, else train.num_epochs x the optimizer steps of one epoch
    (rounded up, as diffusers' num_update_steps_per_epoch), else 100."""
    if t.num_epochs is None:
        return t.max_steps or 100
    return t.num_epochs * math.ceil(batches_per_epoch / t.grad_accum)


# ---------------------------------------------------------------------------------------------
# Loading


# OmegaConf's message for a value outside a `Choice`, reworded as every choice error reads (expected_one_of).
_NOT_A_CHOICE = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]$")


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    if choice := _NOT_A_CHOICE.match(msg):
        value, names = choice.groups()
        return f"config key '{key}': {expected_one_of(names.split(', '), value)}"
    if type(err).__name__ == "ConfigKeyError":
        return f"config key '{key}': unknown key ({msg})"
    if type(err).__name__ == "MissingMandatoryValue":
        return f"config key '{key}': required, but no value was given"
    return f"config key '{key}': {msg}"


class _YamlLoader(get_yaml_loader()):
    """OmegaConf's YAML loader without YAML 1.1 booleans: yes/no/on/off/true/false stay the text typed, so
    `mixed_precision: no` is the string its str key expects; the schema converts them for bool keys."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _YamlLoader.yaml_implicit_resolvers.items()
}


def _read_yaml(text: str, where: str, in_file: bool = False) -> Any:
    """YAML text -> Python values; a syntax error is one line naming `where` (and, in a file, the line and
    column)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if in_file and mark is not None else ""
        raise ConfigError(f"{where}: YAML syntax error{at}: "
                          f"{getattr(err, 'problem', None) or first_line(err)}") from None


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """A recipe may start from another: `inherit: other.yaml` (relative to the file) is merged first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: inherits from itself")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: cannot be read as text ({first_line(err)})") from None
    data = _read_yaml(text, f"config file {path}", in_file=True) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected keys and values at the top level, got a {type(data).__name__}")
    node = OmegaConf.create(data)
    parent = node.pop("inherit", None)
    if parent is None:
        return node
    return OmegaConf.merge(_load_yaml(path.parent / str(parent), seen + (path.resolve(),)), node)


def _sections_stay_sections(merged: Any, data: Any, at: str = "") -> None:
    """A value given for a whole section (`train: 5`) as one line naming it: OmegaConf's merge error names no
    key."""
    for key, value in data.items():
        path = f"{at}.{key}" if at else str(key)
        section = merged._get_node(key) if OmegaConf.is_dict(merged) and key in merged else None
        if not OmegaConf.is_dict(section) or OmegaConf.get_type(section) is dict:  # a mapping value, not a section
            continue
        if isinstance(value, dict):
            _sections_stay_sections(section, value, path)
        elif value is not None:
            raise ConfigError(f"config key '{path}': a section of keys and values, got {limits.shorten(value)}")


def _merge(merged: Any, node: Any) -> Any:
    _sections_stay_sections(merged, OmegaConf.to_container(node, resolve=False))
    return OmegaConf.merge(merged, node)


def load_config(path: str | Path | None, overrides: Sequence[str] = (), *, schema: type) -> Any:
    """YAML file + `key=value` overrides -> a checked `schema` instance (`check_config`)."""
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            merged = _merge(merged, _load_yaml(Path(path)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
        dots = OmegaConf.create()
        for override in overrides:
            key, _, text = override.partition("=")
            OmegaConf.update(dots, key, _read_yaml(text, f"override '{override}'"))
        merged = _merge(merged, dots)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    check_config(cfg)
    return cfg


def check_config(cfg: Section, at: str = "") -> None:
    """Every section's `check`, each given its dotted path; a section's own sections first, so the schema's
    check, the cross-section one, comes last."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):  # a section that is no Section has no check: AttributeError, a programming error
            check_config(value, f"{at}.{f.name}" if at else f.name)
    cfg.check(at)
    for f in fields(cfg):  # then the bounds every key of its name has (cli/limits.py): upper ones, NaN
        key = f"{at}.{f.name}" if at else f.name
        if not is_dataclass(getattr(cfg, f.name)):
            try:
                limits.check_key(key, getattr(cfg, f.name), f"config key '{key}'")
            except UserError as err:
                raise ConfigError(str(err)) from None


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


# ---------------------------------------------------------------------------------------------
# Command line


@functools.cache
def _field_docs(path: str) -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} of the Python file `path`: the string under each field, read with
    `ast` (importing a trainer to read its schema's docs would load torch)."""
    docs = {}
    for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            docs[node.name] = {a.target.id: " ".join(b.value.value.split())
                               for a, b in zip(node.body, node.body[1:])
                               if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
                               and isinstance(b.value, ast.Constant)}
    return docs


def _field_doc(cls: type, name: str) -> str:
    """From the class that declares the field, else the nearest base that documents it, each read from its
    own source file (data/sources/config.py, this file, a trainer's train/tasks/*_config.py)."""
    return next((docs[name] for c in cls.__mro__ if is_dataclass(c)
                 and name in (docs := _field_docs(inspect.getfile(c)).get(c.__name__, {}))), "")


def _allowed(hint: Any) -> str:
    """The values a field typed with a `Choice` takes (C, Optional[C] or list[C]) for --help; else ''."""
    choice = next((t for t in (hint, *get_args(hint)) if isinstance(t, type) and issubclass(t, Choice)), None)
    if choice is None:
        return ""
    names = ", ".join([*choice.__members__, *["null"] * (type(None) in get_args(hint))])
    return f"  ({'each ' if get_origin(hint) is list else ''}one of: {names})"


def config_help(schema: type) -> str:
    """Every key of `schema` with its default and docstring: top-level keys, then section by section."""
    lines = ["config keys (KEY = default):"]

    def walk(obj: Any, prefix: str) -> None:
        hints = get_type_hints(type(obj))
        # Keys before sections: a subclass's new top-level key (model) would otherwise land after `log`.
        for f in sorted(fields(obj), key=lambda f: is_dataclass(getattr(obj, f.name))):
            value, doc = getattr(obj, f.name), _field_doc(type(obj), f.name)
            if is_dataclass(value):
                lines.extend(["", f"{prefix}{f.name}:", *textwrap.wrap(doc, 100, initial_indent="  ",
                                                                       subsequent_indent="  ")])
                walk(value, f"{prefix}{f.name}.")
            else:
                shown = "(required)" if value == MISSING else value if isinstance(value, str) else json.dumps(value)
                lines.append(f"  {prefix}{f.name} = {shown}{_allowed(hints[f.name])}")
                lines.extend(textwrap.wrap(doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))

    walk(schema(), "")
    return "\n".join(lines)


OVERRIDES_HELP = """\
overrides: after --config, any key above as KEY=VALUE, dotted inside a section (train.max_steps=20
optim.betas=[0.9,0.99] resume=null); values are YAML and win over the recipe and its inherit: chain.
train.batch_size is per process: the global batch is batch_size x grad_accum x processes."""


CHECK_CONFIG_HELP = ("load and validate the config, print nothing and exit 0 (a bad config: its one-line error, "
                     "exit 2); launch.sh runs this once before it starts any process")


def parse_args(argv: list[str], description: str | None, schema: type,
               prog: str | None = None) -> argparse.Namespace:
    """`[--print-config | --check-config] --config FILE key=value ...` -> the parsed arguments (config,
    overrides, print_config, check_config); --help lists `schema`."""
    # allow_abbrev=False: launch.sh recognises --help and --print-config by their full names.
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     epilog=f"{config_help(schema)}\n\n{OVERRIDES_HELP}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (recipe, inherit:, overrides; validated) as YAML and exit")
    parser.add_argument("--check-config", action="store_true", help=CHECK_CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    return parser.parse_intermixed_args(argv)


def load_trainer_config(schema: type, argv: list[str], description: str | None, prog: str) -> RunConfig:
    """`--config FILE key=value ...` for a trainer script, validated against the schema it declares
    (`SCHEMA`). With --print-config the config is printed as YAML, with --check-config nothing; either
    way the process then exits 0 before anything starts."""
    # A subclass without @dataclass would silently drop the fields it declares.
    if not (isinstance(schema, type) and issubclass(schema, RunConfig) and "__dataclass_fields__" in vars(schema)):
        raise TypeError(f"load_trainer_config: the schema must be RunConfig or a @dataclass subclass of it, "
                        f"got {schema!r}")
    args = parse_args(argv, description, schema, prog)
    cfg = load_config(args.config, args.overrides, schema=schema)
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    if args.print_config or args.check_config:
        sys.exit(0)
    return cfg
