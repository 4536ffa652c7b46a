import sys

import pytest
from omegaconf import OmegaConf

from sdkd.train.config import Config, ConfigError, load_config, save_config

from conftest import ROOT, run_script


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "teacher: toy\noutput_dir: runs/x\n"


def test_yaml_and_overrides_reach_the_dataclasses(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "train:\n  max_steps: 7\n"), ["train.seed=3", "loss.lambda_feat=0.5",
                                                                           "resume=latest"])
    assert isinstance(cfg, Config)
    assert (cfg.train.max_steps, cfg.train.seed, cfg.loss.lambda_feat, cfg.resume) == (7, 3, 0.5, "latest")
    assert cfg.loss.lambda_task == 1.0 and cfg.loss.lambda_out == 1.0 and cfg.student.preset == "bk_small"


@pytest.mark.parametrize("overrides, expected", [
    (["train.bogus=1"], "config key 'train.bogus': unknown key"),
    (["bogus=1"], "config key 'bogus': unknown key"),
    (["train.max_steps=abc"], "config key 'train.max_steps': Value 'abc'"),
    (["student.preset=huge"], "config key 'student.preset': expected bk_base, bk_small, bk_tiny or custom"),
    (["student.preset=custom"], "config key 'student.keep_down'"),
    (["student.feature_pairs=custom"], "config key 'student.pairs'"),
    (["data.source=imagefolder"], "config key 'data.path': required"),
    (["data.source=laion"], "config key 'data.source': expected synthetic, imagefolder, hf, webdataset, got 'laion'"),
    (["data.source=webdataset"], "config key 'data.path': required when data.source=webdataset"),
    (["data.caption_pick=longest"], "config key 'data.caption_pick': expected first or random"),
    (["data.caption_dropout=1.5"], "config key 'data.caption_dropout': must be in [0, 1]"),
    (["data.min_size=-1"], "config key 'data.min_size'"),
    (["train.mixed_precision=fp8"], "config key 'train.mixed_precision'"),
    (["log.trackers=[mlflow]"], "config key 'log.trackers': unknown tracker 'mlflow'"),
    (["train.max_steps"], "override 'train.max_steps' is not of the form key=value"),
])
def test_errors_name_the_key(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), overrides)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_value(tmp_path):
    with pytest.raises(ConfigError, match="config key 'teacher': required"):
        load_config(write(tmp_path, "output_dir: x\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_inherit_merges_parent_first(tmp_path):
    write(tmp_path, BASE + "train:\n  max_steps: 9\n  seed: 5\n", "parent.yaml")
    cfg = load_config(write(tmp_path, "inherit: parent.yaml\ntrain:\n  seed: 6\n"))
    assert (cfg.train.max_steps, cfg.train.seed, cfg.teacher) == (9, 6, "toy")


def test_recipes_differ_only_in_preset_and_output():
    resolved = {name: OmegaConf.to_container(OmegaConf.structured(
        load_config(ROOT / "configs" / f"{name}.yaml", ["data.path=/d"]))) for name in ("base", "small", "tiny")}
    for cfg in resolved.values():
        cfg["student"].pop("preset"), cfg.pop("output_dir")
    assert resolved["base"] == resolved["small"] == resolved["tiny"]
    assert load_config(ROOT / "configs/small.yaml", ["data.path=/d"]).student.preset == "bk_small"


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(ROOT / "configs/toy.yaml", ["train.max_steps=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_entry_script_reports_one_line_and_exit_2(tmp_path):
    result = run_script([sys.executable, "train/kd.py", "--config", "configs/toy.yaml",
                         f"output_dir={tmp_path}", "train.bogus=1"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: config key 'train.bogus': unknown key (Key 'bogus' not in 'TrainConfig')"
    assert "Traceback" not in result.stderr


def test_finetune_and_lora_recipes_load_with_their_schemas():
    from sdkd.train.config import FinetuneConfig, LoraTrainConfig

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
        load_config(ROOT / "configs/toy.yaml", ["lora.rank=4"])  # KD's schema has no LoRA
    with pytest.raises(ConfigError, match="config key 'data.cache': a latent cache holds text embeddings"):
        load_config(ROOT / "configs/lora_toy.yaml", ["lora.train_text_encoder=true", "data.cache=/c"],
                    schema=LoraTrainConfig)


def test_launch_sh_checks_the_config_before_starting_processes(tmp_path):
    result = run_script(["bash", "launch.sh", "--gpus", "2", "train/kd.py", "--config", "configs/toy.yaml",
                         f"output_dir={tmp_path}", "train.max_steps=zero"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config key 'train.max_steps': Value 'zero' of type 'str' could not be converted to Integer"]
    assert not (tmp_path / "config.yaml").exists()  # no process started
