"""The evaluation's prompt set: the config's list, a prompt file (.txt one per line, or a .csv column such as
BK-SDM's MS-COCO metadata.csv), or a run's sample prompts; cut to `num_images`."""

from __future__ import annotations

from sdkd.cli import limits
from sdkd.cli.errors import ConfigError


def load_prompts(cfg, run_cfg=None) -> list[str]:
    """`cfg` is an EvaluateConfig; `run_cfg` the evaluated run's config (its sample.prompts are the fallback)."""
    if cfg.prompts:
        prompts = list(cfg.prompts)
    elif cfg.prompt_file:
        prompts = limits.read_prompt_file(cfg.prompt_file, "config key 'prompt_file'", cfg.prompt_column,
                                          "config key 'prompt_column'", ConfigError)
    elif run_cfg is not None:
        prompts = list(run_cfg.sample.prompts)
    else:
        raise ConfigError("config key 'prompts': no prompts; set prompts (a list) or prompt_file (a file)")
    prompts = prompts[:cfg.num_images] if cfg.num_images else prompts
    limits.check_seed(cfg.seed, "config key 'seed'", len(prompts))  # image i is seeded seed + i
    return prompts
