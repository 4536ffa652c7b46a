"""The bounds of every text and number a user gives sdkd: on the command line, in a config file, through the
demo's page. One place, so that a prompt, a seed or a step count is held to the same limits wherever it
comes in, and the message names the key or flag it came in by (`name`: "--seed", "config key 'seed'").

A bound is where a value stops being useful and starts costing: CLIP reads 77 tokens of a prompt, so a
megabyte of text buys nothing but memory and log; torch's generators take a signed 64-bit seed; guidance
above a hundred only burns the image. Nothing heavy is imported here (config modules use it).
"""

from __future__ import annotations

import csv
import math
from numbers import Real
from pathlib import Path

from sdkd.cli.errors import UserError, first_line

MAX_PROMPT_CHARS = 10_000  # CLIP reads 77 tokens (a few hundred characters); the rest is dropped anyway
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes, with every image's seed + i
MAX_GUIDANCE = 100.0
MAX_LORA_SCALE = 100.0  # either sign
MAX_STEPS = 1000  # a diffusion schedule's timesteps
MAX_SIDE = 8192  # pixels: four times SDXL's side
MAX_WORKERS = 256  # processes or threads of one command
MAX_BATCH = 4096
MAX_IMAGES = 1_000_000  # images of one command (evaluation, sampling, caching)
MAX_COUNT = 2**31 - 1  # any other integer of a config: steps to train, counts, intervals
DEMO_MAX_BODY = 64 * 1024  # bytes of one request to the demo: two prompts at their bound, and the rest
DEMO_MAX_QUEUE = 16  # requests the demo holds waiting (one runs at a time); more are answered 503 busy
LOG_CHARS = 80  # of a user's text in a log line


def shorten(text: str, limit: int = LOG_CHARS) -> str:
    """`text` for a log line or message: whole when short, else its start and its length."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def check_int(value: object, name: str, low: int, high: int) -> int:
    """An integer from `low` to `high`; else a UserError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{name}: must be an integer from {low:,} to {high:,}, got {shorten(value)}")
    return value


def check_float(value: object, name: str, low: float, high: float) -> float:
    """A finite number from `low` to `high` (NaN and infinities refused); else a UserError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{name}: must be a finite number from {low:g} to {high:g}, got {shorten(value)}")
    return float(value)


def check_seed(value: object, name: str, count: int = 1) -> int:
    """A seed that, with the `count` images seeded `value + i`, stays within torch's generators' range."""
    high = MAX_SEED - max(count - 1, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        extra = f" (seed + {count - 1:,} for {count:,} images)" if count > 1 else ""
        raise UserError(f"{name}: must be an integer from 0 to {high:,}{extra}, got {shorten(value)}")
    return value


def check_guidance(value: object, name: str) -> float:
    return check_float(value, name, 0.0, MAX_GUIDANCE)


def check_steps(value: object, name: str) -> int:
    return check_int(value, name, 1, MAX_STEPS)


def check_side(value: object, name: str, multiple: int = 8) -> int:
    """An image side in pixels: a positive multiple of `multiple` up to MAX_SIDE."""
    if isinstance(value, bool) or not isinstance(value, int) or not (multiple <= value <= MAX_SIDE
                                                                     and value % multiple == 0):
        raise UserError(f"{name}: must be a multiple of {multiple} from {multiple} to {MAX_SIDE:,}, "
                        f"got {shorten(value)}")
    return value


def check_prompt(text: object, name: str) -> str:
    """A prompt of at most MAX_PROMPT_CHARS characters; the message shows only its start."""
    if not isinstance(text, str):
        raise UserError(f"{name}: must be text, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"{name}: at most {MAX_PROMPT_CHARS:,} characters (CLIP reads 77 tokens), got "
                        f"{shorten(text, 40)}")
    return text


def read_prompt_file(path: str | Path, name: str, column: str = "text", column_name: str = "",
                     error: type[UserError] = UserError) -> list[str]:
    """The prompts of a .txt file (one a line, blank lines skipped) or of a .csv file's `column`, at least one, each
    held to `check_prompt`'s bound. The messages name the file as `name` gives it ("--prompts", "config key
    'prompt_file'") and a missing column as `column_name` does; `error` is what they are raised as."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise error(f"{name}: '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{name}: '{path}' cannot be read as text ({first_line(err)})") from None
    if path.suffix.lower() != ".csv":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        rows = csv.DictReader(text.splitlines())
        if column not in (rows.fieldnames or []):
            raise error(f"{column_name or name}: '{path}' has no column '{column}' "
                        f"(its columns: {', '.join(rows.fieldnames or []) or 'none'})")
        prompts = [row[column].strip() for row in rows if (row[column] or "").strip()]
    if not prompts:
        raise error(f"{name}: '{path}' holds no prompt")
    for i, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise error(f"{name}: '{path}', prompt {i}: at most {MAX_PROMPT_CHARS:,} characters (CLIP reads 77 "
                        f"tokens), got {shorten(prompt, 40)}")
    return prompts


def _item(name: str, i: int) -> str:
    """The name of item `i` of the list `name`: config key 'a.b' -> config key 'a.b[i]'."""
    return f"{name[:-1]}[{i}]'" if name.endswith("'") else f"{name}[{i}]"


def _batch(value: object, name: str) -> int:
    return check_int(value, name, 1, MAX_BATCH)


def _workers(value: object, name: str) -> int:
    return check_int(value, name, 0, MAX_WORKERS)


def _prompts(value: object, name: str) -> None:
    for i, text in enumerate(value):
        check_prompt(text, _item(name, i))


# Config keys by their last name: whatever section they are in, they mean the same.
KEY_BOUNDS = {
    "seed": check_seed, "steps": check_steps, "teacher_steps": check_steps, "guidance_scale": check_guidance,
    "teacher_guidance_scale": check_guidance, "real_guidance_scale": check_guidance, "resolution": check_side,
    "resize": check_side, "batch_size": _batch, "num_workers": _workers, "prompts": _prompts,
    "negative_prompt": check_prompt,
}


def check_key(key: str, value: object, name: str) -> None:
    """A config value against its bound: by the key's last name (KEY_BOUNDS), else every number finite and
    every integer within +-MAX_COUNT (lists too). `name` is how the message names it."""
    if value is None:
        return
    last = key.rsplit(".", 1)[-1]
    if last in KEY_BOUNDS:
        KEY_BOUNDS[last](value, name)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"{name}: must be a finite number, got {value}")
    elif isinstance(value, int) and not isinstance(value, bool):
        check_int(value, name, -MAX_COUNT, MAX_COUNT)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, (int, float, list, tuple)) and not isinstance(item, bool):
                check_key(key, item, _item(name, i))
