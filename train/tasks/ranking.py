"""Block ranking: how much removing each removable unit of a teacher U-Net alone changes its noise prediction, and
the `student.preset: custom` spec that fits a size budget with the least predicted damage (train/show_student.py
--rank).

A unit is one removal a custom spec can make (students.py; the units of sdxl-and-scale.md section 4):

- `d{i}.{k}+u{j}.{m}`: resnet k (and its attention) of down block i with resnet m (and attention) of the matching
  up block j: an up block has one resnet more than its down block, so a spec drops a skip's producer and its
  consumer together (BK-SDM's joint unit; block-removal.md section 3);
- `attention L{i}`: every attention of level i (`drop_attention`);
- `d{i}.a{k} tx{l}`, `u{j}.a{m} tx{l}`: transformer layer l of one attention (a depth step of deeper attentions,
  SDXL's); the deepest down level's first attention also sets the mid block's depth, as diffusers builds it, so
  its steps shorten the mid block too;
- `mid attention` (the mid block becomes one resnet), `mid block`, `deepest stage` (the last down block and the
  first up block).

Each unit's student is built from its spec by the weight map with the teacher's tensors shared (`build_student`),
so nothing is hooked. Damage = mean squared difference of its noise prediction from the teacher's over a fixed
probe (prompts x seeds x timesteps), divided by the mean square of the teacher's prediction. The probe's clean
latents are the teacher's own one-step estimates from pure noise (no data needed); the prompts are encoded by the
teacher's family (families.py). LAPTOP-Diff found this output loss close to additive over removed layers, so the
damage of a set is predicted as the sum of its units' (`additivity` measures a few sets to check). Parameters and
MACs (one forward at batch 1 at the teacher's native size, FlopCounterMode on the meta device, MACs = FLOPs / 2)
are the teacher's minus its student's.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sdkd.cli.errors import ConfigError, UserError
from sdkd.train.losses.agreement import spread_timesteps
from sdkd.train.losses.score_distillation import x0_from_prediction
from sdkd.train.models.families import Conditioning, prompt_batch, random_conditioning
from sdkd.train.models.student_config import StudentConfig
from sdkd.train.models.students import (
    PRESETS,
    attention_depths,
    build_student,
    module_sources,
    normalized,
    removal_spec,
    removed_modules,
    student_unet_config,
)

MID_STATES = ("keep", "no_attention", "removed")
# The toy world's held-out captions (configs/eval_toy.yaml): the default probe prompts.
DEFAULT_PROMPTS = (
    "a white circle on a purple background", "a green square on an orange background",
    "a blue triangle on an orange background", "a purple triangle on a red background",
    "an orange square on a green background", "a yellow circle on a black background",
    "an orange square on a red background", "a yellow circle on a red background",
    "a red square on a yellow background", "a blue triangle on a black background",
    "a red circle on a purple background", "a red square on a black background",
    "a white triangle on a black background", "a yellow triangle on a white background",
    "a purple square on a blue background", "a red triangle on a green background",
)


# ---------------------------------------------------------------------------------------------
# Removals: sets of units, and the custom spec of one


@dataclass(frozen=True)
class Removal:
    """What a student removes of its teacher, unit by unit."""

    pairs: frozenset = frozenset()
    """(level, down index, up index) joint units."""
    drop_attention: frozenset = frozenset()
    """Levels whose attentions go."""
    layers: frozenset = frozenset()
    """(teacher attention, transformer layer index) units."""
    mid: str = "keep"
    """keep, no_attention (one resnet left) or removed."""
    deepest: bool = False

    def __or__(self, other: Removal) -> Removal:
        return Removal(self.pairs | other.pairs, self.drop_attention | other.drop_attention, self.layers | other.layers,
                       max(self.mid, other.mid, key=MID_STATES.index), self.deepest or other.deepest)

    def units(self) -> list[Removal]:
        """Each unit alone."""
        return ([Removal(pairs=frozenset([p])) for p in sorted(self.pairs)]
                + [Removal(drop_attention=frozenset([i])) for i in sorted(self.drop_attention)]
                + [Removal(layers=frozenset([x])) for x in sorted(self.layers)]
                + [Removal(mid=self.mid)] * (self.mid != "keep") + [Removal(deepest=True)] * self.deepest)


def label(unit: Removal, levels: int) -> str:
    """A unit's name in the table."""
    if unit.pairs:
        (i, k, m), = unit.pairs
        return f"d{i}.{k}+u{levels - 1 - i}.{m}"
    if unit.drop_attention:
        return f"attention L{next(iter(unit.drop_attention))}"
    if unit.layers:
        (name, layer), = unit.layers
        kind, block, _, index = name.split(".")
        return f"{kind[0]}{block}.a{index} tx{layer}"
    return "deepest stage" if unit.deepest else {"no_attention": "mid attention", "removed": "mid block"}[unit.mid]


def _level_of_attention(name: str, levels: int) -> int | None:
    """The level (0 = highest resolution) of a teacher attention; None for the mid block's."""
    kind, block = name.split(".")[:2]
    return None if kind == "mid_block" else int(block) if kind == "down_blocks" else levels - 1 - int(block)


def effective(removal: Removal, levels: int) -> Removal:
    """The removal without the units another one already takes away (a removed stage's units, the layers of a
    removed attention, the mid block's layers when it loses its attention)."""
    gone_level = {levels - 1} if removal.deepest else set()
    pairs = frozenset(p for p in removal.pairs if p[0] not in gone_level)
    drop = frozenset(i for i in removal.drop_attention if i not in gone_level)
    gone_attention = {f"down_blocks.{i}.attentions.{k}" for i, k, _ in pairs}
    gone_attention |= {f"up_blocks.{levels - 1 - i}.attentions.{m}" for i, _, m in pairs}

    def kept(name: str) -> bool:
        level = _level_of_attention(name, levels)
        if level is None:
            return removal.mid == "keep"
        return name not in gone_attention and level not in drop and level not in gone_level

    layers = frozenset(x for x in removal.layers if kept(x[0]))
    return Removal(pairs, drop, layers, removal.mid, removal.deepest)


def student_section(teacher_config: dict, removal: Removal) -> dict:
    """The `student` section (preset custom) of a removal: what the KD trainer takes as is."""
    levels = len(teacher_config["down_block_types"])
    per_block = teacher_config["layers_per_block"]
    layers = per_block if isinstance(per_block, list) else [per_block] * levels
    removal = effective(removal, levels)
    keep_down = [[k for k in range(layers[i]) if all(p[:2] != (i, k) for p in removal.pairs)] for i in range(levels)]
    keep_up = [[m for m in range(layers[levels - 1 - j] + 1)
                if all((p[0], p[2]) != (levels - 1 - j, m) for p in removal.pairs)] for j in range(levels)]
    if removal.deepest:
        keep_down[-1], keep_up[0] = [], []  # ignored by the spec: the stage is gone
    section = dict(preset="custom", keep_down=keep_down, keep_up=keep_up, mid_block=removal.mid != "removed",
                   deepest_stage=not removal.deepest, drop_attention=sorted(removal.drop_attention),
                   mid_attention=removal.mid != "no_attention")
    if removal.layers:
        section.update(_depth_keys(teacher_config, removal, section))
    return section


def _depth_keys(teacher_config: dict, removal: Removal, structure: dict) -> dict:
    """transformer_layers_per_block, its reverse and an explicit layer_init naming the kept layers of every
    shallower student attention."""
    depths = attention_depths(normalized(teacher_config))
    gone = {}
    for name, layer in removal.layers:
        gone.setdefault(name, set()).add(layer)

    def entries(kind: str, keep: list) -> list:
        return [[depths[f"{kind}.{b}.attentions.{k}"] - len(gone.get(f"{kind}.{b}.attentions.{k}", ()))
                 for k in kept] if f"{kind}.{b}.attentions.0" in depths else 1 for b, kept in enumerate(keep)]

    keys = dict(transformer_layers_per_block=entries("down_blocks", structure["keep_down"]),
                reverse_transformer_layers_per_block=entries("up_blocks", structure["keep_up"]))
    spec = removal_spec(StudentConfig(**{**structure, **keys}))
    student = student_unet_config(teacher_config, spec)
    sources = module_sources(teacher_config, spec, (Transformer2DModel,))
    init = {}
    for name, depth in attention_depths(student).items():
        source = sources[name]
        if depth < depths[source]:  # the mid block follows the deepest down depth: its first kept layers
            init[name] = [x for x in range(depths[source]) if x not in gone.get(source, ())][:depth]
    return dict(keys, layer_init=init)


def student_config(teacher_config: dict, removal: Removal) -> StudentConfig:
    """The removal's student section as a checked `StudentConfig`; ConfigError when no valid student has it."""
    cfg = StudentConfig(**student_section(teacher_config, removal))
    student_unet_config(teacher_config, removal_spec(cfg))  # the structural checks
    return cfg


def removal_of(teacher_config: dict, preset: str) -> Removal | None:
    """A preset as units, when it is a set of them (its student config equals theirs); else None."""
    spec = PRESETS[preset]
    levels = len(teacher_config["down_block_types"])
    t = normalized(teacher_config)
    per = t["layers_per_block"]
    layers = per if isinstance(per, list) else [per] * levels
    try:
        target = student_unet_config(t, spec)
    except ConfigError:
        return None
    pairs = set()
    for i in range(levels - (not spec.deepest_stage)):
        j = levels - 1 - i
        down = [k for k in range(layers[i]) if k not in spec.keep_down[i]]
        up = [m for m in range(layers[i] + 1) if m not in spec.keep_up[j]]
        pairs |= {(i, k, m) for k, m in zip(down, up)}
    mid = "removed" if not spec.mid_block else "keep" if spec.mid_attention else "no_attention"
    depths, student_depths = attention_depths(t), attention_depths(target)
    sources = module_sources(t, spec, (Transformer2DModel,))
    gone = frozenset((src, x) for name, src in sources.items() if not src.startswith("mid")
                     for x in range(student_depths[name], depths[src]))
    removal = Removal(frozenset(pairs), frozenset(spec.drop_attention), gone, mid, not spec.deepest_stage)
    try:
        cfg = student_config(t, removal)
        same = student_unet_config(t, removal_spec(cfg)) == target
    except ConfigError:
        return None
    return removal if same and spec.layer_init == "first" else None


# ---------------------------------------------------------------------------------------------
# Units and their size


def candidate_units(teacher_config: dict) -> list[Removal]:
    """Every unit that alone makes a valid student of this teacher."""
    t = normalized(teacher_config)
    levels = len(t["down_block_types"])
    per = t["layers_per_block"]
    layers = per if isinstance(per, list) else [per] * levels
    depths = attention_depths(t)
    found = [Removal(pairs=frozenset([(i, k, m)])) for i in range(levels)
             for k in range(layers[i]) for m in range(layers[i])]
    found += [Removal(drop_attention=frozenset([i])) for i in range(levels)]
    found += [Removal(layers=frozenset([(name, x)])) for name, depth in depths.items()
              if not name.startswith("mid") for x in range(depth) if depth > 1]
    found += [Removal(mid="no_attention"), Removal(mid="removed"), Removal(deepest=True)]
    units = []
    for unit in found:
        try:
            student_config(t, unit)
        except (ConfigError, UserError):
            continue
        units.append(unit)
    return units


def _counted(unet_config: dict, latent_hw: tuple[int, int]) -> tuple[UNet2DConditionModel, FlopCounterMode]:
    """A U-Net of the config on the meta device and the FLOPs of its one forward at batch 1 and this latent size.
    Attention runs in SDPA's math backend, whose products FlopCounterMode counts."""
    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel.from_config(unet_config)
    sample = torch.empty(1, unet.config.in_channels, *latent_hw, device=meta)
    cond = random_conditioning(unet.config, 1, device=meta)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        unet(sample, torch.full((1,), 500, device=meta), **cond.unet_kwargs())
    return unet, counter


def size(unet_config: dict, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(parameters, MACs of one forward at batch 1 and this latent size) of a U-Net config."""
    unet, counter = _counted(unet_config, latent_hw)
    return sum(p.numel() for p in unet.parameters()), counter.get_total_flops() // 2


@functools.lru_cache(maxsize=4)
def _module_sizes(config_json: str, latent_hw: tuple[int, int]) -> tuple[tuple[int, int], dict, dict]:
    """The teacher's (parameters, MACs) and both per module, from one forward."""
    unet, counter = _counted(json.loads(config_json), latent_hw)
    top = type(unet).__name__ + "."
    macs = {name.removeprefix(top): sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()
            if name.startswith(top)}
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in unet.named_modules()}
    return (params[""], counter.get_total_flops() // 2), params, macs


def removed_size(teacher_config: dict, removal: Removal, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(parameters, MACs) of the teacher modules the removal takes away, at the teacher's resolutions: exact
    sizes of the removed modules (the deepest stage's also moves the mid block to a finer level, which is not
    counted here; `removal_size` builds the student)."""
    _, params, macs = _module_sizes(json.dumps(normalized(teacher_config), sort_keys=True), latent_hw)
    gone = removed_modules(teacher_config, removal_spec(student_config(teacher_config, removal)))
    return sum(params[name] for name in gone), sum(macs.get(name, 0) for name in gone)


def native_latent(teacher_config: dict) -> tuple[int, int]:
    value = teacher_config.get("sample_size") or 64  # SD-1.x/2.x configs always set it; 64: a 512-px latent
    return tuple(value) if isinstance(value, list) else (value, value)


def removal_size(teacher_config: dict, removal: Removal, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(parameters, MACs) of the removal's student."""
    spec = removal_spec(student_config(teacher_config, removal))
    return size(student_unet_config(teacher_config, spec), latent_hw)


# ---------------------------------------------------------------------------------------------
# The probe and the damage


@dataclass
class Probe:
    """Fixed U-Net inputs (prompts x seeds x timesteps) and the teacher's predictions on them."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    teacher_pred: torch.Tensor
    batch: int = 8

    def __len__(self) -> int:
        return len(self.timesteps)


@torch.no_grad()
def _predict(unet, probe: Probe) -> torch.Tensor:
    out = []
    for start in range(0, len(probe), probe.batch):
        part = slice(start, start + probe.batch)
        cond = Conditioning.from_tensors({k: v[part] for k, v in probe.cond.tensors().items()})
        out.append(unet(probe.noisy[part], probe.timesteps[part], **cond.unet_kwargs()).sample.float())
    return torch.cat(out)


@torch.no_grad()
def make_probe(parts, prompts: list[str], seeds: int, timesteps: int, resolution: int, batch: int = 8) -> Probe:
    """Prompts x seeds x timesteps inputs: each (prompt, seed)'s clean latent is the teacher's one-step estimate
    from pure noise seeded `seed`; x_t adds fixed noise at `timesteps` spread over the schedule."""
    unet, scheduler = parts.unet.eval(), parts.scheduler
    latent = resolution // parts.vae_scale_factor
    cond = parts.family.encode(parts, prompt_batch(prompts, resolution))
    rows = [(p, s) for p in range(len(prompts)) for s in range(seeds)]
    index = torch.tensor([p for p, _ in rows])
    cond = Conditioning.from_tensors({k: v[index].float() for k, v in cond.tensors().items()})
    shape = (unet.config.in_channels, latent, latent)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for _, s in rows])
    last = scheduler.config.num_train_timesteps - 1
    probe = Probe(noise, torch.full((len(rows),), last), cond, torch.empty(0), batch)
    x0 = x0_from_prediction(_predict(unet, probe), noise, scheduler.alphas_cumprod, probe.timesteps,
                            scheduler.config.prediction_type)
    steps = spread_timesteps(timesteps, scheduler.config.num_train_timesteps)
    g = torch.Generator().manual_seed(2 ** 32)  # the added noise: never one of the seeds above
    eps = torch.randn(len(rows) * len(steps), *x0.shape[1:], generator=g)
    t = torch.tensor(steps).repeat(len(rows))
    x0 = x0.repeat_interleave(len(steps), 0)
    noisy = scheduler.add_noise(x0, eps, t)
    cond = Conditioning.from_tensors({k: v.repeat_interleave(len(steps), 0) for k, v in cond.tensors().items()})
    probe = Probe(noisy, t, cond, torch.empty(0), batch)
    probe.teacher_pred = _predict(unet, probe)
    return probe


def damage(parts, probe: Probe, teacher_config: dict, removal: Removal) -> float:
    """The removal's noise-prediction MSE against the teacher on the probe, over the teacher's mean square."""
    spec = removal_spec(student_config(teacher_config, removal))
    student = build_student(parts.unet, spec, share=True).eval()
    pred = _predict(student, probe)
    return float(((pred - probe.teacher_pred) ** 2).mean() / (probe.teacher_pred ** 2).mean())


# ---------------------------------------------------------------------------------------------
# Ranking, additivity, budget


def shown(damage_value: float) -> str:
    """A damage as tables print it: four decimals, a tiny one in exponent notation rather than as 0."""
    return f"{damage_value:.4f}" if damage_value >= 1e-3 or damage_value == 0 else f"{damage_value:.1e}"


@dataclass
class Row:
    unit: Removal
    name: str
    params: int
    """Parameters the unit removes."""
    macs: int
    """MACs it removes."""
    damage: float


@dataclass
class Ranking:
    teacher_params: int
    teacher_macs: int
    latent_hw: tuple[int, int]
    rows: list[Row]
    """Least damage first."""
    levels: int
    additivity: list[dict] = field(default_factory=list)
    presets: list[dict] = field(default_factory=list)
    proposal: dict | None = None
    probe: dict = field(default_factory=dict)
    """prompts, seeds, timesteps, resolution of the probe."""

    def predicted(self, removal: Removal) -> float:
        damages = {r.unit: r.damage for r in self.rows}
        return sum(damages[u] for u in effective(removal, self.levels).units())

    def to_json(self) -> dict:
        return dict(teacher_params=self.teacher_params, teacher_macs=self.teacher_macs,
                    macs_latent=list(self.latent_hw),
                    units=[dict(unit=r.name, params=r.params, macs=r.macs, damage=r.damage) for r in self.rows],
                    additivity=self.additivity, presets=self.presets, proposal=self.proposal,
                    probe=self.probe)


def sized_units(config: dict) -> Ranking:
    """Every unit with the parameters and MACs it removes; damages not measured yet (NaN)."""
    levels = len(config["down_block_types"])
    latent = native_latent(config)
    (teacher_params, teacher_macs), _, _ = _module_sizes(json.dumps(normalized(config), sort_keys=True), latent)
    rows = [Row(unit, label(unit, levels), *removed_size(config, unit, latent), float("nan"))
            for unit in candidate_units(config)]
    return Ranking(teacher_params, teacher_macs, latent, rows, levels)


def measure_units(parts, probe: Probe, ranking: Ranking, tick: Callable[[], None] = lambda: None) -> None:
    """Each unit's damage; the rows then sorted least damage first (ties by name)."""
    config = dict(parts.unet.config)
    for row in ranking.rows:
        row.damage = damage(parts, probe, config, row.unit)
        tick()
    ranking.rows.sort(key=lambda r: (r.damage, r.name))


def check_budget(ranking: Ranking, config: dict, budget: int, by: str) -> None:
    """UserError unless some student smaller than the teacher fits `budget`."""
    total = ranking.teacher_params if by == "params" else ranking.teacher_macs
    if budget >= total:
        raise UserError(f"--budget-{by} {budget:,}: the teacher itself fits ({total:,}); give a smaller budget")
    smallest = _smallest(ranking, config, by)
    if budget < smallest:
        raise UserError(f"--budget-{by} {budget:,}: no student of this teacher fits; the smallest the units make "
                        f"has {smallest:,} {'parameters' if by == 'params' else 'MACs'}")


def compatible_sets(ranking: Ranking, config: dict, count: int) -> list[Removal]:
    """Up to `count` pairs of units that overlap in nothing and make a valid student together, least summed damage
    first among the units that do measurable damage (over 1% of the largest): the sets a budget combines."""
    top = max((r.damage for r in ranking.rows), default=0.0)
    units = [r.unit for r in ranking.rows if r.damage > 0.01 * top]
    found = []
    for a, b in sorted(itertools.combinations(units, 2), key=lambda ab: ranking.predicted(ab[0] | ab[1])):
        both = a | b
        if len(effective(both, ranking.levels).units()) != 2:
            continue
        try:
            student_config(config, both)
        except ConfigError:
            continue
        found.append(both)
        if len(found) == count:
            break
    return found


def measure_sets(parts, probe: Probe, ranking: Ranking, sets: Iterable[tuple[str, Removal]],
                 tick: Callable[[], None] = lambda: None) -> list[dict]:
    """Each named set's measured damage against the sum of its units' (ratio 1: exactly additive)."""
    config = dict(parts.unet.config)
    out = []
    for name, removal in sets:
        measured = damage(parts, probe, config, removal)
        predicted = ranking.predicted(removal)
        out.append(dict(name=name, units=[label(u, ranking.levels) for u in effective(removal, ranking.levels).units()],
                        predicted=predicted, measured=measured,
                        ratio=measured / predicted if predicted > 0 else float("nan")))
        tick()
    return out


def _structures(ranking: Ranking) -> Iterable[Removal]:
    """Every valid-looking combination of the non-layer units: per level at most layers - 1 pairs with distinct
    down and up indices, any attention drops, a mid state, the deepest stage or not."""
    units = [r.unit for r in ranking.rows]
    pairs_by_level = {}
    for u in units:
        for p in u.pairs:
            pairs_by_level.setdefault(p[0], []).append(p)
    choices = []
    for _, pairs in sorted(pairs_by_level.items()):
        options = [frozenset()]
        for size_ in range(1, len({p[1] for p in pairs})):
            options += [frozenset(c) for c in itertools.combinations(pairs, size_)
                        if len({p[1] for p in c}) == size_ == len({p[2] for p in c})]
        choices.append([Removal(pairs=o) for o in options])
    for u in units:
        if u.drop_attention:
            choices.append([Removal(), u])
    choices.append([Removal()] + [u for u in units if u.mid != "keep"])
    choices.append([Removal()] + [u for u in units if u.deepest])
    for combo in itertools.product(*choices):
        removal = Removal()
        for part in combo:
            removal = removal | part
        if removal == effective(removal, ranking.levels):  # a removed stage's units make no other student
            yield removal


def propose(ranking: Ranking, config: dict, budget: int, by: str) -> tuple[Removal, int, int]:
    """The removal with the least predicted damage whose student has at most `budget` parameters (`by` params) or
    MACs (macs): structures in full, transformer layers added greedily by damage per unit of cost. Its exact size
    is checked; UserError when no student fits."""
    cost = {r.unit: (r.params if by == "params" else r.macs) for r in ranking.rows}
    total = ranking.teacher_params if by == "params" else ranking.teacher_macs
    need = total - budget
    layer_units = sorted((r for r in ranking.rows if r.unit.layers),
                         key=lambda r: r.damage / max(cost[r.unit], 1))
    candidates = []
    for structure in _structures(ranking):
        removal = structure
        removed = sum(cost[u] for u in structure.units())
        for row in layer_units:
            if removed >= need:
                break
            grown = effective(removal | row.unit, ranking.levels)
            if grown != removal and _keeps_a_layer(grown, config):
                removal, removed = grown, removed + cost[row.unit]
        if removed >= need:
            candidates.append((ranking.predicted(removal), -removed, removal))
    candidates.sort(key=lambda c: (c[0], c[1]))
    for _, _, removal in candidates:
        try:
            params, macs = removal_size(config, removal, ranking.latent_hw)
        except ConfigError:
            continue
        if (params if by == "params" else macs) <= budget:
            return removal, params, macs
    raise UserError(f"--budget-{by} {budget:,}: no student of this teacher fits with the units' predicted sizes "
                    f"(the smallest has {_smallest(ranking, config, by):,})")


def _keeps_a_layer(removal: Removal, config: dict) -> bool:
    depths = attention_depths(normalized(config))
    gone = {}
    for name, _ in removal.layers:
        gone[name] = gone.get(name, 0) + 1
    return all(depths[name] > count for name, count in gone.items())


def _smallest(ranking: Ranking, config: dict, by: str) -> int:
    """The smallest size the units make (every structure with every transformer layer it can lose), from the
    units' sizes: they remove disjoint modules, so their sizes add up."""
    cost = {r.unit: (r.params if by == "params" else r.macs) for r in ranking.rows}
    most = 0
    for structure in _structures(ranking):
        removal = structure
        for row in ranking.rows:
            grown = effective(removal | row.unit, ranking.levels) if row.unit.layers else removal
            removal = grown if _keeps_a_layer(grown, config) else removal
        most = max(most, sum(cost[u] for u in removal.units()))
    return (ranking.teacher_params if by == "params" else ranking.teacher_macs) - most


def proposal_yaml(config: dict, removal: Removal) -> str:
    """The proposal as a recipe's `student:` section (YAML; the KD trainer's config takes it as is)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml({"student": student_section(config, removal)})


def report(parts, prompts: list[str], seeds: int, timesteps: int, resolution: int, budget: int | None = None,
           by: str | None = None, checks: int = 3, show_progress: bool = True) -> Ranking:
    """The whole --rank run: the probe, every unit's damage, `checks` pairs and the presets that are sets of units
    measured against their predicted damage, and with a budget (`by`: params or macs) the proposal, measured too."""
    from sdkd.train.engine.console import progress

    config = dict(parts.unet.config)
    ranking = sized_units(config)
    if budget is not None:
        check_budget(ranking, config, budget, by)
    presets = [(name, r) for name in PRESETS if (r := removal_of(config, name)) is not None]
    total = len(ranking.rows) + checks + len(presets) + (budget is not None)
    bar = progress(total, "removals measured", unit="student", disable=not show_progress)
    probe = make_probe(parts, prompts, seeds, timesteps, resolution)
    measure_units(parts, probe, ranking, bar.update)
    pairs = compatible_sets(ranking, config, checks)
    bar.total = len(ranking.rows) + len(pairs) + len(presets) + (budget is not None)
    ranking.additivity = measure_sets(parts, probe, ranking, [(" + ".join(
        label(u, ranking.levels) for u in s.units()), s) for s in pairs], bar.update)
    ranking.presets = measure_sets(parts, probe, ranking, presets, bar.update)
    for row, (_, removal) in zip(ranking.presets, presets):
        row["params"], row["macs"] = removal_size(config, removal, ranking.latent_hw)
    if budget is not None:
        removal, params, macs = propose(ranking, config, budget, by)
        measured, = measure_sets(parts, probe, ranking, [("proposal", removal)], bar.update)
        ranking.proposal = dict(measured, by=by, budget=budget, params=params, macs=macs,
                                student=student_section(config, removal))
    bar.close()
    ranking.probe = dict(prompts=len(prompts), seeds=seeds, timesteps=timesteps, resolution=resolution)
    return ranking
