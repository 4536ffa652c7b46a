"""eval/evaluate.py's parts that need no model: its config, the prompt set, the report table."""

from __future__ import annotations

import pytest

from sdkd.cli.errors import ConfigError
from sdkd.eval.evaluation.config import EvaluateConfig
from sdkd.eval.evaluation.prompts import load_prompts
from sdkd.eval.evaluation.report import markdown
from sdkd.train.engine.config import load_config
from sdkd.train.tasks.diffusion_config import KDConfig

from conftest import ROOT


def config(*overrides):
    return load_config(None, list(overrides), schema=EvaluateConfig)


@pytest.mark.parametrize("name", ["eval_toy", "eval_bk_sdm_coco30k", "eval_sdxs_coco5k"])
def test_shipped_configs_load(name, tmp_path):
    prompts = tmp_path / "captions.txt"
    prompts.write_text("a cat\n\na dog\n")
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"prompt_file={prompts}"] * (name != "eval_toy"),
                      schema=EvaluateConfig)
    assert cfg.steps in (1, None, 25)  # None: each model's recorded sampling settings
    assert load_prompts(cfg) == (["a cat", "a dog"] if name != "eval_toy" else cfg.prompts)
    if name != "eval_toy":  # the protocols name a placeholder caption file: not set, it stops naming the key
        with pytest.raises(ConfigError, match="config key 'prompt_file': '[A-Z0-9_/]+[.a-z]+' does not exist"):
            load_prompts(load_config(ROOT / "configs" / f"{name}.yaml", [], schema=EvaluateConfig))


def test_bk_sdm_protocol_settings():
    cfg = load_config(ROOT / "configs" / "eval_bk_sdm_coco30k.yaml", ["prompt_file=x.csv"], schema=EvaluateConfig)
    assert (cfg.num_images, cfg.steps, cfg.guidance_scale, cfg.seed, cfg.batch_size, cfg.resolution, cfg.resize,
            cfg.sampler) == (30000, 25, 7.5, 1234, 1, 512, 256, "pndm")


@pytest.mark.parametrize("overrides, key", [
    (["prompts=[a]", "prompt_file=p.txt"], "prompt_file"),
    (["resize=100"], "resize"),
    (["latency.repeats=0"], "latency.repeats"),
    (["agreement.timesteps=0"], "agreement.timesteps"),
    (["metrics.inception_weights=/w.pth"], "metrics.inception_weights"),  # FID needs real images or statistics
    (["reference_images=/r", "metrics.fid_reference_stats=/s.npz", "metrics.inception_weights=/w"],
     "reference_images"),
])
def test_config_mistakes_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        config(*overrides)


def test_prompts_from_list_txt_csv_or_the_run(tmp_path):
    assert load_prompts(config("prompts=[a, b, c]", "num_images=2")) == ["a", "b"]
    txt = tmp_path / "p.txt"
    txt.write_text("  a red fox \n\nthe moon\n")
    assert load_prompts(config(f"prompt_file={txt}")) == ["a red fox", "the moon"]
    csv = tmp_path / "metadata.csv"
    csv.write_text('file_name,text\nCOCO_1.jpg,"a man, on a horse"\nCOCO_2.jpg,a bus\n')
    assert load_prompts(config(f"prompt_file={csv}")) == ["a man, on a horse", "a bus"]
    with pytest.raises(ConfigError, match="config key 'prompt_column': .* has no column 'caption'"):
        load_prompts(config(f"prompt_file={csv}", "prompt_column=caption"))
    with pytest.raises(ConfigError, match="config key 'prompt_file': .* does not exist"):
        load_prompts(config(f"prompt_file={tmp_path / 'missing.txt'}"))
    run_cfg = load_config(ROOT / "configs" / "toy.yaml", [f"output_dir={tmp_path}"], schema=KDConfig)
    assert load_prompts(config(), run_cfg) == run_cfg.sample.prompts
    with pytest.raises(ConfigError, match="config key 'prompts': no prompts"):
        load_prompts(config())


def test_report_table_has_a_column_only_for_what_some_row_has():
    report = dict(model="runs/x", teacher="toy", skipped=["skipped CLIP score: set metrics.clip_model to ..."],
                  settings=dict(num_images=4, steps=8, guidance_scale=3.0, sampler="dpm_solver", resolution=32,
                                resize=None, batch_size=4, device="cpu", dtype="float32"),
                  triples=dict(prompts=["a", "b"], timesteps=4, seed=0),
                  rows=[dict(name="teacher", step=None, unet_params=3222692, unet_macs=153466880, noise_mse=0.0),
                        dict(name="checkpoint-30", step=30, unet_params=1887940, unet_macs=98498560,
                             noise_mse=0.01667, sample_mse=0.000625, sample_psnr=32.06, fid=float("nan"))])
    md = markdown(report)
    assert "| model | step | U-Net params | U-Net GMACs | noise MSE | sample MSE | PSNR dB | FID |" in md
    assert "| teacher |  | 3,222,692 | 0.153 | 0 |  |  |  |" in md
    assert "| checkpoint-30 | 30 | 1,887,940 | 0.098 | 0.01667 | 0.000625 | 32.06 |  |" in md
    assert "- skipped CLIP score" in md and "teacher `toy`; 4 images per model" in md


def test_report_shows_caption_colour_hits_as_percentages_with_their_note():
    report = dict(model="runs/x", teacher="toy", skipped=[],
                  settings=dict(num_images=24, steps=20, guidance_scale=4.0, sampler="dpm_solver", resolution=32,
                                resize=None, batch_size=8, device="cpu", dtype="float32"),
                  rows=[dict(name="teacher", step=None, fg_colour=0.9583, bg_colour=0.75),
                        dict(name="checkpoint-60", step=60, fg_colour=0.875, bg_colour=0.5)])
    md = markdown(report)
    assert "| model | step | fg colour | bg colour |" in md
    assert "| teacher |  | 96% | 75% |" in md and "| checkpoint-60 | 60 | 88% | 50% |" in md
    assert "fg / bg colour: how often" in md
    assert "fg colour" not in markdown(report | {"rows": [dict(name="teacher", step=None, noise_mse=0.0)]})
