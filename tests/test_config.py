import ast
import importlib.util
import json
import re
import sys
from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from sdkd.cli.errors import ConfigError
from sdkd.data.sources.config import DataSource
from sdkd.train.engine.config import (
    LRScheduler,
    MixedPrecision,
    RunConfig,
    Tracker,
    load_config,
    load_trainer_config,
    parse_args,
    save_config,
)
from sdkd.train.tasks.diffusion_config import FinetuneConfig, KDConfig, LoraTrainConfig

from conftest import ROOT, run_script


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "teacher: toy\noutput_dir: runs/x\n"


def test_yaml_and_overrides_reach_the_dataclasses(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "train:\n  max_steps: 7\n"), ["train.seed=3", "loss.lambda_feat=0.5",
                                                                           "resume=latest"], schema=KDConfig)
    assert isinstance(cfg, KDConfig)
    assert (cfg.train.max_steps, cfg.train.seed, cfg.loss.lambda_feat, cfg.resume) == (7, 3, 0.5, "latest")
    assert cfg.loss.lambda_task == 1.0 and cfg.loss.lambda_out == 1.0 and cfg.student.preset == "bk_small"


@pytest.mark.parametrize("overrides, expected", [
    (["train.bogus=1"], "config key 'train.bogus': unknown key"),
    (["bogus=1"], "config key 'bogus': unknown key"),
    (["train.max_steps=abc"], "config key 'train.max_steps': Value 'abc'"),
    (["student.preset=huge"], "config key 'student.preset': expected bk_base, bk_small, bk_tiny, sdxs, ssd1b, vega, "
                              "koala_1b, koala_700m or custom"),
    (["student.preset=custom"], "config key 'student.keep_down'"),
    (["student.feature_pairs=custom"], "config key 'student.pairs'"),
    (["data.source=imagefolder"], "config key 'data.path': required"),
    (["data.source=laion"], "config key 'data.source': expected synthetic, imagefolder, hf or webdataset, got 'laion'"),
    (["data.source=webdataset"], "config key 'data.path': required when data.source=webdataset"),
    (["data.caption_pick=longest"], "config key 'data.caption_pick': expected first or random, got 'longest'"),
    (["data.caption_dropout=1.5"], "config key 'data.caption_dropout': must be in [0, 1]"),
    (["data.min_size=-1"], "config key 'data.min_size'"),
    (["train.mixed_precision=fp8"], "config key 'train.mixed_precision': expected no, fp16 or bf16, got 'fp8'"),
    (["optim.implementation=apex"], "config key 'optim.implementation': expected auto, fused, foreach or loop, "
                                    "got 'apex'"),
    (["student.feature_pairs=all"], "config key 'student.feature_pairs': expected bk, segmind, sub_block or custom, "
                                    "got 'all'"),
    (["train.seed=yes"], "config key 'train.seed': Value 'yes' of type 'str' could not be converted to Integer"),
    (["ema.enabled=maybe"], "config key 'ema.enabled': Value 'maybe' is not a valid bool"),
    (["log.trackers=[wandb,mlflow]"], "config key 'log.trackers[1]': expected wandb, tensorboard or none, "
                                      "got 'mlflow'"),
    (["data.interpolation=cubic"], "config key 'data.interpolation': expected nearest, bilinear, bicubic, lanczos, "
                                   "box or hamming, got 'cubic'"),
    (["data.max_train_samples=0"], "config key 'data.max_train_samples': must be > 0 or null"),
    (["train.max_steps=5", "train.num_epochs=2"], "config key 'train.num_epochs': train.max_steps and "
                                                  "train.num_epochs are both set: set one, the other to null"),
    (["train.num_epochs=0"], "config key 'train.num_epochs': must be > 0 or null"),
    (["loss.noise_offset=-0.1"], "config key 'loss.noise_offset': must be >= 0"),
    (["loss.input_perturbation=-0.1"], "config key 'loss.input_perturbation': must be >= 0"),
    (["loss.prediction_type=sample"], "config key 'loss.prediction_type': expected epsilon or v_prediction, "
                                      "got 'sample'"),
    (["model_variant=fp16"], "config key 'model_variant': unknown key"),  # KD has no `model`
    (["train.max_steps"], "override 'train.max_steps' is not of the form key=value"),
    (["optim.lr=-1e-4"], "config key 'optim.lr': must be > 0"),
    (["optim.betas=[0.9,1.0]"], "config key 'optim.betas': expected two numbers in [0, 1)"),
    (["optim.betas=[-0.1,0.9]"], "config key 'optim.betas'"),
    (["optim.lr_scheduler=cosin"], "config key 'optim.lr_scheduler': expected constant, constant_with_warmup, "
                                   "linear, cosine, cosine_with_restarts or polynomial, got 'cosin'"),
    (["optim.warmup_steps=-5"], "config key 'optim.warmup_steps': must be >= 0"),
    (["optim.eps=0"], "config key 'optim.eps': must be > 0"),
    (["optim.weight_decay=-1"], "config key 'optim.weight_decay': must be >= 0"),
    (["optim.name=adamw_8bit", "optim.implementation=fused"],
     "config key 'optim.implementation': chooses torch AdamW's kernel: leave it at auto with optim.name=adamw_8bit"),
    (["optim.name=adam8"], "config key 'optim.name': expected adamw or adamw_8bit, got 'adam8'"),
    (["ema.decay=1.5"], "config key 'ema.decay': must be in [0, 1]"),
    (["train.max_grad_norm=-1"], "config key 'train.max_grad_norm': must be >= 0"),
    (["train.seed=-3"], "config key 'train.seed': must be >= 0"),
    (["sample.steps=0"], "config key 'sample.steps': must be > 0"),
    (["sample.guidance_scale=-2"], "config key 'sample.guidance_scale': must be >= 0"),
    (["sample.resolution=100"], "config key 'sample.resolution': must be a multiple of 8"),
    (["loss.lambda_task=0", "loss.lambda_out=0", "loss.lambda_feat=0"],
     "config key 'loss.lambda_task': every loss weight (loss.lambda_task, lambda_out, lambda_feat) is 0"),
    (["overwrite=true", "resume=latest"], "config key 'overwrite': overwrite=true replaces the run"),
    (["data.max_bad_in_a_row=0"], "config key 'data.max_bad_in_a_row': must be > 0"),
    (["train.max_steps=[1"], "override 'train.max_steps=[1': YAML syntax error: did not find expected ','"),
])
def test_errors_name_the_key(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), overrides, schema=KDConfig)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("section, expected", [
    ("train:\n  mixed_precision: fp64\n", "config key 'train.mixed_precision': expected no, fp16 or bf16, got 'fp64'"),
    ("data:\n  source: laion\n", "config key 'data.source': expected synthetic, imagefolder, hf or webdataset, "
                                 "got 'laion'"),
    ("log:\n  trackers: [tensorboard, mlflow]\n", "config key 'log.trackers[1]': expected wandb, tensorboard or none, "
                                                   "got 'mlflow'"),
    ("loss:\n  prediction_type: sample\n", "config key 'loss.prediction_type': expected epsilon or v_prediction, "
                                          "got 'sample'"),
])
def test_a_choice_outside_its_set_in_a_file_names_the_allowed_values(tmp_path, section, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE + section), schema=KDConfig)
    assert str(err.value) == expected


def test_choices_compare_print_and_serialize_as_their_text(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.mixed_precision=bf16", "log.trackers=[wandb,none]"],
                      schema=KDConfig)
    assert isinstance(cfg.train.mixed_precision, MixedPrecision) and cfg.train.mixed_precision == "bf16"
    assert (str(cfg.train.mixed_precision), f"{cfg.data.source}", f"{cfg.data.source:>10}") == \
        ("bf16", "synthetic", " synthetic")
    assert cfg.log.trackers == ["wandb", "none"] and {"synthetic": 1}[cfg.data.source] == 1
    assert json.dumps([cfg.optim.lr_scheduler, *cfg.log.trackers]) == '["constant", "wandb", "none"]'


def test_diffusers_options_and_their_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE), schema=KDConfig)
    assert (cfg.loss.noise_offset, cfg.loss.input_perturbation, cfg.loss.prediction_type) == (0.0, 0.0, None)
    assert (cfg.data.max_train_samples, cfg.data.interpolation) == (None, "bilinear")
    assert (cfg.train.max_steps, cfg.train.num_epochs, cfg.teacher_revision, cfg.teacher_variant) == (None,) * 4
    cfg = load_config(write(tmp_path, BASE), ["loss.noise_offset=0.05", "loss.input_perturbation=0.1",
                                              "loss.prediction_type=v_prediction", "data.max_train_samples=8",
                                              "data.interpolation=lanczos", "train.num_epochs=3",
                                              "teacher_revision=main", "teacher_variant=fp16"], schema=KDConfig)
    assert (cfg.loss.noise_offset, cfg.loss.input_perturbation, cfg.loss.prediction_type, cfg.data.max_train_samples,
            cfg.data.interpolation, cfg.train.num_epochs, cfg.teacher_revision, cfg.teacher_variant) == \
        (0.05, 0.1, "v_prediction", 8, "lanczos", 3, "main", "fp16")


def test_max_steps_from_epochs_rounds_up_per_epoch():
    from sdkd.train.engine.config import TrainConfig, resolve_max_steps

    assert resolve_max_steps(TrainConfig(num_epochs=3, grad_accum=2), batches_per_epoch=5) == 9  # 3 x ceil(5/2)
    assert resolve_max_steps(TrainConfig(num_epochs=2), batches_per_epoch=5) == 10
    assert resolve_max_steps(TrainConfig(max_steps=7), batches_per_epoch=5) == 7
    assert resolve_max_steps(TrainConfig(), batches_per_epoch=5) == 100


def test_missing_required_value(tmp_path):
    with pytest.raises(ConfigError, match="config key 'teacher': required"):
        load_config(write(tmp_path, "output_dir: x\n"), schema=KDConfig)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", schema=KDConfig)


def test_inherit_merges_parent_first(tmp_path):
    write(tmp_path, BASE + "train:\n  max_steps: 9\n  seed: 5\n", "parent.yaml")
    cfg = load_config(write(tmp_path, "inherit: parent.yaml\ntrain:\n  seed: 6\n"), schema=KDConfig)
    assert (cfg.train.max_steps, cfg.train.seed, cfg.teacher) == (9, 6, "toy")


def test_recipes_differ_only_in_preset_and_output():
    resolved = {name: OmegaConf.to_container(OmegaConf.structured(
        load_config(ROOT / "configs" / f"{name}.yaml", ["data.path=/d"], schema=KDConfig)))
        for name in ("base", "small", "tiny")}
    for cfg in resolved.values():
        cfg["student"].pop("preset"), cfg.pop("output_dir")
    assert resolved["base"] == resolved["small"] == resolved["tiny"]
    assert load_config(ROOT / "configs/small.yaml", ["data.path=/d"], schema=KDConfig).student.preset == "bk_small"


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(ROOT / "configs/toy.yaml", ["train.max_steps=3"], schema=KDConfig)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", schema=KDConfig) == cfg
    # Every kind of choice field away from its default, in the largest schema.
    cfg = load_config(ROOT / "configs/lora_toy.yaml", [
        "train.mixed_precision=bf16", "optim.lr_scheduler=cosine", "optim.implementation=foreach",
        "loss.prediction_type=v_prediction", "log.trackers=[wandb,tensorboard]", "data.interpolation=lanczos",
        "data.caption_pick=random", "student.preset=bk_tiny", "student.feature_pairs=segmind"], schema=LoraTrainConfig)
    save_config(cfg, tmp_path / "lora.yaml")
    text = (tmp_path / "lora.yaml").read_text()
    assert "mixed_precision: bf16\n" in text and "- wandb\n" in text and "prediction_type: v_prediction\n" in text
    loaded = load_config(tmp_path / "lora.yaml", schema=LoraTrainConfig)
    assert loaded == cfg and type(loaded.loss.prediction_type) is type(cfg.loss.prediction_type)
    assert all(isinstance(t, Tracker) for t in loaded.log.trackers)


def test_entry_script_reports_one_line_and_exit_2(tmp_path):
    result = run_script([sys.executable, "train/kd.py", "--config", "configs/toy.yaml",
                         f"output_dir={tmp_path}", "train.bogus=1"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: config key 'train.bogus': unknown key "
                                                      "(Key 'bogus' not in 'UNetTrainConfig')")
    assert "Traceback" not in result.stderr


def test_finetune_and_lora_recipes_load_with_their_schemas():
    portrait = load_config(ROOT / "configs/portrait.yaml", ["data.path=/data/portraits"], schema=FinetuneConfig)
    assert (portrait.data.resolution, portrait.optim.lr, portrait.train.batch_size, portrait.train.grad_accum,
            portrait.train.max_steps, portrait.train.mixed_precision, portrait.loss.snr_gamma) == \
        (768, 1e-4, 32, 4, 131000, "fp16", 5.0)
    assert portrait.teacher is None and (portrait.loss.lambda_out, portrait.loss.lambda_feat) == (0, 0)
    toy = load_config(ROOT / "configs/portrait_toy.yaml", schema=FinetuneConfig)
    assert toy.model == "toy" and toy.data.source == "synthetic"
    lora = load_config(ROOT / "configs/lora.yaml", ["model=runs/tiny/student", "data.path=/d"], schema=LoraTrainConfig)
    assert (lora.lora.rank, lora.lora.alpha, lora.optim.lr) == (16, 27, 1e-4)
    lora_toy = load_config(ROOT / "configs/lora_toy.yaml", schema=LoraTrainConfig)
    assert lora_toy.model == "runs/toy/student" and lora_toy.data.resolution == 32
    with pytest.raises(ConfigError, match="config key 'model': required"):
        load_config(ROOT / "configs/lora.yaml", ["data.path=/d"], schema=LoraTrainConfig)
    with pytest.raises(ConfigError, match="config key 'lora': unknown key"):
        load_config(ROOT / "configs/toy.yaml", ["lora.rank=4"], schema=KDConfig)  # KD's schema has no LoRA
    with pytest.raises(ConfigError, match="config key 'data.cache': a latent cache holds text embeddings"):
        load_config(ROOT / "configs/lora_toy.yaml", ["lora.train_text_encoder=true", "data.cache=/c"],
                    schema=LoraTrainConfig)


@pytest.mark.parametrize("override, error", [
    ("train.max_steps=zero",
     "config key 'train.max_steps': Value 'zero' of type 'str' could not be converted to Integer"),
    ("train.mixed_precision=fp64", "config key 'train.mixed_precision': expected no, fp16 or bf16, got 'fp64'"),
])
def test_launch_sh_checks_the_config_before_starting_processes(tmp_path, override, error):
    result = run_script(["./launch.sh", "--gpus", "2", "train/kd.py", "--config", "configs/toy.yaml",
                         f"output_dir={tmp_path}", override], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {error}"]
    assert not (tmp_path / "config.yaml").exists()  # no process started


@pytest.mark.parametrize("script, args", [
    ("train/kd.py", ["--config", "configs/toy.yaml"]),
    ("train/finetune.py", ["--config", "configs/portrait_toy.yaml"]),
    ("train/lora.py", ["--config", "configs/lora_toy.yaml"]),
    ("train/cache_latents.py", ["--config", "configs/toy.yaml", "data.cache={out}"]),
])
def test_check_config_exits_0_silently_or_2_with_one_line(tmp_path, script, args):
    out = tmp_path / "run"
    check = [sys.executable, script, *[a.format(out=out) for a in args], f"output_dir={out}"]
    result = run_script(check[:1] + ["-X", "importtime"] + check[1:] + ["--check-config"], timeout=300)
    assert (result.returncode, result.stdout) == (0, ""), result.stderr[-3000:]
    assert not out.exists()  # nothing started
    assert not re.search(r"\|\s+(torch|diffusers)$", result.stderr, re.M)  # nor imported: launch.sh waits for it
    result = run_script(check + ["data.interpolation=cubic", "--check-config"], timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config key 'data.interpolation': expected nearest, bilinear, bicubic, lanczos, box or hamming, "
        "got 'cubic'"]


def test_cache_latents_dtype_names_are_the_latent_caches():
    # train/cache_latents.py names them without importing the cache module (torch): --check-config stays fast.
    from sdkd.data.sources.latent_cache import DTYPES
    from sdkd.train.cache_latents import DTYPE_NAMES

    assert DTYPE_NAMES == tuple(sorted(DTYPES))


def _keys(node, prefix=""):
    for key, value in node.items():
        yield from _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]


@dataclass
class _ScriptConfig(KDConfig):
    """A schema declared outside train/, as a trainer's may be."""

    extra: int = 3
    """A key only this schema has."""


@pytest.mark.parametrize("schema, own", [
    (KDConfig, "\n  teacher = (required)\n      Teacher: hub id, local diffusers folder"),
    (FinetuneConfig, "\n  model = (required)\n      The pipeline to train"),
    (LoraTrainConfig, "\n  optim.lr = 0.0001\n      Peak learning rate."),
    (_ScriptConfig, "\n  extra = 3\n      A key only this schema has."),
])
def test_help_lists_every_key_with_default_docstring_and_choices(schema, own, capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"], "a trainer", schema)
    assert done.value.code == 0
    text = capsys.readouterr().out
    for key in _keys(OmegaConf.to_container(OmegaConf.structured(schema))):
        assert f"\n  {key} = " in text, key
    assert ("\n  train.batch_size = 4\n      Samples per process per micro-step: the global batch is batch_size x "
            "grad_accum x processes.") in text
    # Docstrings of data/sources/config.py's fields, and each choice's allowed values.
    assert ("\n  data.source = synthetic  (one of: synthetic, imagefolder, hf, webdataset)\n"
            "      synthetic (built-in") in text
    assert "\n  train.mixed_precision = no  (one of: no, fp16, bf16)\n      Autocast for the student" in text
    assert "\n  loss.prediction_type = null  (one of: epsilon, v_prediction, null)\n" in text
    assert '\n  log.trackers = ["tensorboard"]  (each one of: wandb, tensorboard, none)\n' in text
    assert "KEY=VALUE, dotted inside a section" in text and "train.batch_size is per process" in text
    assert "--check-config" in text
    # Each schema's own defaults and docstrings, not KDConfig's.
    assert own in text


def test_help_imports_neither_torch_nor_diffusers():
    result = run_script([sys.executable, "-X", "importtime", "train/lora.py", "--help"], timeout=60)
    assert result.returncode == 0 and "\n  lora.rank = 16\n" in result.stdout
    assert not re.search(r"\|\s+(torch|diffusers)$", result.stderr, re.M)


def test_every_trainer_script_declares_its_schema():
    """A script that loads a trainer config (load_trainer_config, or run_trainer that calls it) names the
    schema it reads in a module-level SCHEMA, and passes that."""
    scripts = {}
    for path in sorted((ROOT / "train").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id in ("load_trainer_config", "run_trainer")]
        main = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        if calls and main:
            scripts[path.name] = (calls, {t.id for n in tree.body if isinstance(n, ast.Assign)
                                          for t in n.targets if isinstance(t, ast.Name)})
    assert {"kd.py", "finetune.py", "lora.py", "one_step.py"} <= set(scripts)
    for name, (calls, assigned) in scripts.items():
        assert "SCHEMA" in assigned, f"train/{name} loads a trainer config but declares no module-level SCHEMA"
        assert all(ast.unparse(c.args[0]) == "SCHEMA" for c in calls), f"train/{name} does not pass SCHEMA"


@pytest.mark.parametrize("schema", [dict, {"teacher": "toy"}, type("NotADataclass", (KDConfig,), {"extra": 1})])
def test_a_schema_that_is_not_a_config_dataclass_is_a_programming_error(schema):
    with pytest.raises(TypeError, match="load_trainer_config: the schema must be RunConfig or a @dataclass subclass"):
        load_trainer_config(schema, ["--config", str(ROOT / "configs/toy.yaml")], None, prog="x.py")


def test_print_config_prints_the_resolved_config(tmp_path, capsys):
    write(tmp_path, BASE + "train:\n  max_steps: 9\n  seed: 5\n", "parent.yaml")
    child = write(tmp_path, "inherit: parent.yaml\ntrain:\n  grad_accum: 2\n")
    with pytest.raises(SystemExit) as done:
        load_trainer_config(KDConfig, ["--config", str(child), "--print-config", "train.seed=8"], "kd", prog="kd.py")
    assert done.value.code == 0
    printed = load_config(write(tmp_path, capsys.readouterr().out, "printed.yaml"), schema=KDConfig)
    assert printed == load_config(child, ["train.seed=8"], schema=KDConfig)
    assert (printed.teacher, printed.train.max_steps, printed.train.grad_accum, printed.train.seed) == ("toy", 9, 2, 8)


def test_yaml_boolean_words_stay_text_for_str_keys(tmp_path):
    """`no`, `off`, `Yes`... are YAML 1.1 booleans; a str key gets the word typed, a bool key the boolean."""
    recipe = write(tmp_path, BASE + "train:\n  mixed_precision: no\ndata:\n  split: 'on'\n  center_crop: off\n")
    cfg = load_config(recipe, schema=KDConfig)
    assert (cfg.train.mixed_precision, cfg.data.split, cfg.data.center_crop) == ("no", "on", False)
    cfg = load_config(recipe, ["train.mixed_precision=no", "data.split=Yes", "data.manifest=OFF", "ema.enabled=yes"],
                      schema=KDConfig)
    assert (cfg.train.mixed_precision, cfg.data.split, cfg.data.manifest, cfg.ema.enabled) == ("no", "Yes", "OFF", True)


def test_print_config_from_the_trainer_starts_nothing(tmp_path):
    out = tmp_path / "run"
    result = run_script([sys.executable, "train/kd.py", "--config", "configs/toy.yaml", "--print-config",
                         "train.max_steps=7", f"output_dir={out}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = load_config(write(tmp_path, result.stdout, "printed.yaml"), schema=KDConfig)
    assert printed == load_config(ROOT / "configs/toy.yaml", ["train.max_steps=7", f"output_dir={out}"],
                                  schema=KDConfig)
    assert printed.train.max_steps == 7 and printed.train.mixed_precision == "no"
    assert not out.exists()


def test_launch_sh_answers_print_config_and_help_once(tmp_path):
    out = tmp_path / "run"
    launch = ["bash", "launch.sh", "--gpus", "2", "train/kd.py", "--config", "configs/toy.yaml"]
    result = run_script(launch + ["--print-config", "train.max_steps=7", f"output_dir={out}"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(re.findall(r"^teacher: toy$", result.stdout, re.M)) == 1
    assert load_config(write(tmp_path, result.stdout, "printed.yaml"), schema=KDConfig).train.max_steps == 7
    assert not out.exists()  # no process started
    result = run_script(launch + ["--help"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("usage: kd.py") == 1 and "\n  train.batch_size = 4\n" in result.stdout


def test_lr_scheduler_names_are_diffusers_own():
    from diffusers.optimization import SchedulerType

    assert set(LRScheduler.__members__) <= {t.value for t in SchedulerType}


def test_config_names_exactly_the_sources_the_data_package_implements():
    # data/sources/config.py declares them without importing the module that registers them (torch, PIL).
    from sdkd.data.sources.core import SOURCES

    assert set(SOURCES) == set(DataSource.__members__)


@pytest.mark.parametrize("text, expected", [
    ("teacher: toy\ntrain:\n  max_steps: [1, 2\n", r"config file .*bad.yaml: YAML syntax error at line 4, column 1"),
    ("teacher: toy\n  output_dir: x\n", r"config file .*bad.yaml: YAML syntax error at line 2, column 13"),
    ("- teacher: toy\n- output_dir: x\n",
     r"config file .*bad.yaml: expected keys and values at the top level, got a list"),
])
def test_a_broken_config_file_is_one_line_with_file_line_and_column(tmp_path, text, expected):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(tmp_path / "bad.yaml", [f"output_dir={tmp_path}"], schema=KDConfig)
    assert "\n" not in str(err.value)


def test_a_binary_config_file_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="config file .*bad.yaml: cannot be read as text"):
        load_config(tmp_path / "bad.yaml", [], schema=KDConfig)


def test_sdxs_recipes_are_bk_sdms_and_toys_with_the_sdxs_student_and_no_task_loss():
    """configs/sdxs.yaml is tiny.yaml (BK-SDM's) but for the sdxs preset, output dir and no denoising loss (output and
    feature KD at 1); sdxs_toy.yaml: the toy teacher, the sdxs preset, no task loss, synthetic data."""
    def resolved(name):
        return OmegaConf.to_container(OmegaConf.structured(load_config(ROOT / "configs" / name, ["data.path=/d"],
                                                                       schema=KDConfig)))

    sdxs, tiny = resolved("sdxs.yaml"), resolved("tiny.yaml")
    assert (sdxs["student"]["preset"], sdxs["loss"]["lambda_task"], sdxs["loss"]["lambda_out"],
            sdxs["loss"]["lambda_feat"]) == ("sdxs", 0.0, 1.0, 1.0)
    for cfg in (sdxs, tiny):
        cfg["student"].pop("preset"), cfg.pop("output_dir"), cfg["loss"].pop("lambda_task")
    assert sdxs == tiny
    toy = load_config(ROOT / "configs/sdxs_toy.yaml", schema=KDConfig)
    assert (toy.teacher, toy.student.preset, toy.loss.lambda_task, toy.data.source) == ("toy", "sdxs", 0.0, "synthetic")


# Published SDXL recipes (sdxl-and-scale.md 1.2, 1.5; losses-and-recipes.md 2-3): preset, U-Net parameters,
# steps, batch x grad-accum, lr, resolution, loss weights, feature table.
SDXL_RECIPES = {
    "ssd1b": ("ssd1b", 1_331_334_404, 251_000, 32, 4, 1e-5, 1024, (1.0, 0.5, 0.5), "sub_block"),
    "vega": ("vega", 745_225_604, 540_000, 16, 8, 1e-5, 1024, (1.0, 0.5, 0.5), "sub_block"),
    "koala_700m": ("koala_700m", 782_822_724, 500_000, 32, 4, 1e-5, 1024, (1.0, 1.0, 1.0), "bk"),
}


@pytest.mark.parametrize("name", SDXL_RECIPES)
def test_sdxl_recipes_follow_the_published_ones_and_pass_check_config(name, tmp_path):
    from sdkd.train.models.sd_configs import SDXL_UNET
    from sdkd.train.models.students import count_params, removal_spec, student_unet_config

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["data.path=/d"], schema=KDConfig)
    preset, params, steps, batch, accum, lr, resolution, weights, pairs = SDXL_RECIPES[name]
    assert cfg.teacher == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.license == "openrail++"
    assert (cfg.student.preset, cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.optim.lr,
            cfg.data.resolution, cfg.train.mixed_precision) == (preset, steps, batch, accum, lr, resolution, "fp16")
    assert (cfg.loss.lambda_task, cfg.loss.lambda_out, cfg.loss.lambda_feat) == weights
    assert cfg.student.feature_pairs == pairs and not cfg.ema.enabled
    assert count_params(student_unet_config(SDXL_UNET, removal_spec(cfg.student))) == params
    with pytest.raises(ConfigError, match="config key 'data.path': "):  # the data are the user's to give
        load_config(ROOT / "configs" / f"{name}.yaml", [], schema=KDConfig)
    result = run_script([sys.executable, "train/kd.py", "--config", f"configs/{name}.yaml", "data.path=/d",
                         f"output_dir={tmp_path / 'run'}", "--check-config"], timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# ---------------------------------------------------------------------------------------------
# One base, each trainer's own keys, one way to check a section

TRAINERS = {  # script -> (its recipe, its schema's module)
    "kd.py": ("toy.yaml", "sdkd.train.tasks.diffusion_config"),
    "finetune.py": ("portrait_toy.yaml", "sdkd.train.tasks.diffusion_config"),
    "lora.py": ("lora_toy.yaml", "sdkd.train.tasks.diffusion_config"),
    "autoencoder.py": ("toy_vae.yaml", "sdkd.train.tasks.autoencoder_config"),
    "tiny_decoder.py": ("toy_decoder.yaml", "sdkd.train.tasks.decoder_config"),
    "one_step.py": ("one_step_toy.yaml", "sdkd.train.tasks.one_step_config"),
}


def _schema(script):
    import importlib

    return importlib.import_module(f"sdkd.train.{script.removesuffix('.py')}").SCHEMA


def _schema_keys(schema) -> set[str]:
    return set(_keys(OmegaConf.to_container(OmegaConf.structured(schema))))


def test_every_trainer_schema_is_a_run_config_of_a_tasks_config_module():
    """Entry scripts hold no schema of their own: each SCHEMA is a RunConfig of a light train/tasks/*_config.py."""
    assert set(TRAINERS) == {p.name for p in (ROOT / "train").glob("*.py") if "SCHEMA =" in p.read_text()}
    for script, (_, module) in TRAINERS.items():
        schema = _schema(script)
        assert issubclass(schema, RunConfig) and schema.__module__ == module, script


@pytest.mark.parametrize("script", TRAINERS)
def test_each_trainers_help_lists_exactly_its_schemas_keys(script):
    result = run_script([sys.executable, "-X", "importtime", f"train/{script}", "--help"], timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not re.search(r"\|\s+(torch|diffusers)$", result.stderr, re.M)
    listed = set(re.findall(r"^  (\S+) = ", result.stdout.split("config keys")[1], re.M))
    own = _schema_keys(_schema(script))
    assert listed == own
    others = set().union(*(_schema_keys(_schema(s)) for s in TRAINERS if s != script)) - own
    assert others and not listed & others  # keys of the other trainers: none of them shown


@pytest.mark.parametrize("script, keys", [
    ("autoencoder.py", ["teacher", "license", "train.gradient_checkpointing", "student.preset", "loss.lambda_feat",
                        "sample.prompts", "eval.every"]),
    ("tiny_decoder.py", ["model", "train.gradient_checkpointing", "student.preset", "loss.lambda_task",
                         "sample.guidance_scale", "eval.num_prompts"]),
    ("one_step.py", ["loss.lambda_out", "student.feature_pairs", "sample.steps", "eval.timesteps", "lora.rank"]),
    ("kd.py", ["model", "lora.rank", "autoencoder.l1_weight", "decoder.channels", "pairs.count", "distill.t_min"]),
])
def test_keys_the_trainer_never_reads_are_not_in_its_schema(script, keys):
    own = _schema_keys(_schema(script))
    assert not [key for key in keys if key in own]


@pytest.mark.parametrize("script, override, error", [
    ("autoencoder.py", "loss.lambda_feat=0.5", "config key 'loss': unknown key (Key 'loss' not in "
                                               "'AutoencoderTrainConfig')"),
    ("autoencoder.py", "teacher=toy", "config key 'teacher': unknown key (Key 'teacher' not in "
                                      "'AutoencoderTrainConfig')"),
    ("tiny_decoder.py", "student.preset=bk_tiny", "config key 'student': unknown key (Key 'student' not in "
                                                  "'TinyDecoderConfig')"),
    ("tiny_decoder.py", "train.gradient_checkpointing=true", "config key 'train.gradient_checkpointing': unknown key "
                                                             "(Key 'gradient_checkpointing' not in 'TrainConfig')"),
    ("one_step.py", "sample.steps=4", "config key 'sample.steps': unknown key (Key 'steps' not in "
                                      "'SamplePromptsConfig')"),
    ("one_step.py", "student.feature_pairs=bk", "config key 'student.feature_pairs': unknown key (Key "
                                                "'feature_pairs' not in 'BlockRemovalConfig')"),
    ("kd.py", "autoencoder.model=toy", "config key 'autoencoder': unknown key (Key 'autoencoder' not in 'KDConfig')"),
    ("finetune.py", "online.lr=1e-4", "config key 'online': unknown key (Key 'online' not in 'FinetuneConfig')"),
])
def test_another_trainers_key_is_unknown(script, override, error):
    recipe = ROOT / "configs" / TRAINERS[script][0]
    with pytest.raises(ConfigError) as err:
        load_config(recipe, [override], schema=_schema(script))
    assert str(err.value) == error


def test_another_trainers_key_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    result = run_script([sys.executable, "train/autoencoder.py", "--config", "configs/toy_vae.yaml",
                         f"output_dir={tmp_path / 'r'}", "student.preset=bk_tiny", "--check-config"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: config key 'student': unknown key (Key 'student' not in 'AutoencoderTrainConfig')"]


def _sections(schema):
    """(dotted path, section) of every section of `schema`'s default tree, the root ('') first."""
    from dataclasses import fields as dc_fields
    from dataclasses import is_dataclass

    found = []

    def walk(node, at):
        found.append((at, node))
        for f in dc_fields(node):
            value = getattr(node, f.name)
            if is_dataclass(value):
                walk(value, f"{at}.{f.name}" if at else f.name)

    walk(schema(), "")
    return found


def _bad_values():
    """Section class -> [(override inside it, the key its check names)]: one bad value per section check."""
    from sdkd.data.sources.config import DataConfig
    from sdkd.eval.evaluation.config import EvaluateConfig, LatencyConfig
    from sdkd.eval.metrics.config import MetricsConfig
    from sdkd.train.engine.config import EMAConfig, EvalConfig, OptimConfig, TrainConfig
    from sdkd.train.formats.lora_config import LoraSection
    from sdkd.train.losses.config import LossConfig, TriplesConfig
    from sdkd.train.models.student_config import BlockRemovalConfig, StudentConfig
    from sdkd.train.tasks import autoencoder_config as ae
    from sdkd.train.tasks import decoder_config as td
    from sdkd.train.tasks import diffusion_config as dc
    from sdkd.train.tasks import one_step_config as os_

    return {
        RunConfig: [(["overwrite=true", "resume=latest"], "overwrite")],
        FinetuneConfig: [(["loss.lambda_out=0.5"], "loss.lambda_out")],
        LoraTrainConfig: [(["lora.train_text_encoder=true", "data.cache=/c"], "data.cache")],
        ae.AutoencoderTrainConfig: [(["data.cache=/c"], "data.cache")],
        os_.OneStepConfig: [(["train.num_epochs=2", "train.max_steps=null"], "train.num_epochs")],
        EvaluateConfig: [(["prompt_file=p.txt"], "prompt_file")],
        TrainConfig: [(["batch_size=0"], "batch_size"), (["num_workers=-1"], "num_workers")],
        OptimConfig: [(["lr=0"], "lr")],
        EMAConfig: [(["decay=2"], "decay")],
        DataConfig: [(["resolution=12"], "resolution")],
        EvalConfig: [(["every=-1"], "every")],
        TriplesConfig: [(["timesteps=0"], "timesteps")],
        LatencyConfig: [(["repeats=0"], "repeats")],
        MetricsConfig: [(["kid_subset_size=1"], "kid_subset_size")],
        dc.SamplePromptsConfig: [(["prompts=[]"], "prompts"), (["resolution=12"], "resolution")],
        dc.SampleConfig: [(["steps=0"], "steps")],
        BlockRemovalConfig: [(["preset=custom"], "keep_down")],
        StudentConfig: [(["feature_pairs=custom"], "pairs")],
        LossConfig: [(["snr_gamma=0"], "snr_gamma")],
        LoraSection: [(["rank=0"], "rank")],
        ae.AutoencoderSection: [(["sample_images=0"], "sample_images")],
        td.DecoderSection: [(["channels=0"], "channels")],
        td.GanSection: [(["every=0"], "every")],
        td.DecoderEvalConfig: [(["seed=-1"], "seed")],
        os_.PairsSection: [(["count=0"], "count")],
        os_.FeatureMatchingSection: [(["window=4"], "window")],
        os_.Ramp: [(["steps=-1"], "steps")],
        os_.DistillSection: [(["student_every=0"], "student_every")],
        os_.OnlineSection: [(["lora_rank=0"], "lora_rank")],
        os_.GanSection: [(["start=-1"], "start")],
    }


def _section_cases():
    from sdkd.eval.evaluation.config import EvaluateConfig

    recipes = {_schema(script): recipe for script, (recipe, _) in TRAINERS.items()} | {EvaluateConfig: "eval_toy.yaml"}
    bad = _bad_values()
    for schema, recipe in recipes.items():
        for at, section in _sections(schema):
            # Each check of the section's classes, the inherited ones too (a KD `eval` is EvalConfig and TriplesConfig).
            for cls in type(section).__mro__:
                for overrides, key in bad.get(cls, []) if "check" in vars(cls) else []:
                    prefix = f"{at}." if at else ""
                    yield pytest.param(schema, recipe, [prefix + o for o in overrides] if at else overrides,
                                       prefix + key, id=f"{schema.__name__}-{at or 'root'}-{cls.__name__}-{key}")


def test_every_section_check_has_a_bad_value_below():
    """A section with a check of its own, in any trainer's schema or eval/evaluate.py's, is exercised below."""
    from sdkd.eval.evaluation.config import EvaluateConfig

    bad = _bad_values()
    checked = {cls for schema in [*map(_schema, TRAINERS), EvaluateConfig] for _, section in _sections(schema)
               for cls in type(section).__mro__ if "check" in vars(cls) and cls.__name__ != "Section"}
    assert checked == set(bad)


@pytest.mark.parametrize("schema, recipe, overrides, key", list(_section_cases()))
def test_the_loader_reaches_every_sections_check(schema, recipe, overrides, key):
    """A bad value in any section is its own key's error, one line: the loader calls every section's check,
    each with its dotted path, and the schema's own cross-section check."""
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / recipe, overrides, schema=schema)
    assert str(err.value).startswith(f"config key '{key}': "), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_8bit_adamw_without_bitsandbytes_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), ["optim.name=adamw_8bit"], schema=KDConfig)
    assert str(err.value) == ("config key 'optim.name': adamw_8bit needs bitsandbytes, which is not installed "
                              "(pip install bitsandbytes; CUDA only), or use adamw")
