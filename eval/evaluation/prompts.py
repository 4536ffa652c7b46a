"""The evaluation's prompt set: the config's list, a prompt file (.txt one per line, or a .csv column such as
BK-SDM's MS-COCO metadata.csv), or a run's sample prompts; cut to `num_images`."""

from __future__ import annotations

import csv
from pathlib import Path

from sdkd.cli import limits
from sdkd.cli.errors import ConfigError, first_line


def read_prompt_file(path: str | Path, column: str = "text") -> list[str]:
    """Prompts of a .txt file (one per line, blank lines skipped) or of a .csv file's `column`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'prompt_file': '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config key 'prompt_file': '{path}' cannot be read as text ({first_line(err)})") from None
    if path.suffix.lower() != ".csv":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        rows = csv.DictReader(text.splitlines())
        if column not in (rows.fieldnames or []):
            raise ConfigError(f"config key 'prompt_column': '{path}' has no column '{column}' "
                              f"(its columns: {', '.join(rows.fieldnames or []) or 'none'})")
        prompts = [row[column].strip() for row in rows if (row[column] or "").strip()]
    if not prompts:
        raise ConfigError(f"config key 'prompt_file': '{path}' holds no prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) > limits.MAX_PROMPT_CHARS:  # a prompt, not its whole file, in the message
            raise ConfigError(f"config key 'prompt_file': '{path}', prompt {i + 1}: at most "
                              f"{limits.MAX_PROMPT_CHARS:,} characters (CLIP reads 77 tokens), got "
                              f"{limits.shorten(prompt, 40)}")
    return prompts


def load_prompts(cfg, run_cfg=None) -> list[str]:
    """`cfg` is an EvaluateConfig; `run_cfg` the evaluated run's config (its sample.prompts are the fallback)."""
    if cfg.prompts:
        prompts = list(cfg.prompts)
    elif cfg.prompt_file:
        prompts = read_prompt_file(cfg.prompt_file, cfg.prompt_column)
    elif run_cfg is not None:
        prompts = list(run_cfg.sample.prompts)
    else:
        raise ConfigError("config key 'prompts': no prompts; set prompts (a list) or prompt_file (a file)")
    prompts = prompts[:cfg.num_images] if cfg.num_images else prompts
    limits.check_seed(cfg.seed, "config key 'seed'", len(prompts))  # image i is seeded seed + i
    return prompts
