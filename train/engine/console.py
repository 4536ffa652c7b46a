"""What sdkd prints while it runs: known-harmless third-party notices silenced at their source (`dropping`:
only where sdkd knows they are harmless), and progress that stays readable in a log file.

`quiet_third_party()` runs when `sdkd.train` is first imported (some notices are printed while
diffusers imports), and again before a pipeline loads (diffusers has no progress-bar switch that can
be set before it is imported). Nothing heavy is imported with this module (tqdm is imported on use).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from typing import Iterator


class _DropMessage(logging.Filter):
    """Drops a logger's records whose message `pattern` (a regular expression) finds."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _Shorten(logging.Filter):
    """Cuts a logger's long messages to their start and length: diffusers' pipelines log the part of a
    prompt CLIP drops, whole, on every call (a prompt of 10,000 characters, six calls of an evaluation)."""

    def __init__(self, limit: int = 200):
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if len(text) > self.limit:
            record.msg, record.args = f"{text[:self.limit]}... ({len(text):,} characters)", ()
        return True


_FILTERS = {
    **{f"diffusers.pipelines.stable_diffusion{xl}.pipeline_stable_diffusion{xl}": _Shorten() for xl in ("", "_xl")},
    # torchvision is deliberately not installed: transformers falls back to the PIL image processors
    # (CLIP's, SigLIP's) that diffusers' pipeline modules import, and we never use either.
    "transformers.utils.import_utils": _DropMessage(re.escape("requires torchvision (not installed)")),
    # diffusers' ModelMixin.to warns on every dtype cast, also when the model has no fp32-only modules (`[]`).
    "diffusers.models.modeling_utils": _DropMessage(re.escape("should be kept in float32: []")),
    # diffusers' AutoencoderTiny copies decoder_block_out_channels into its config as block_out_channels (what
    # pipelines read for the VAE's scale) and does so again on every init, so every config.json it saves holds
    # a key its own loader calls unexpected. Only that key alone, for that class.
    "diffusers.configuration_utils": _DropMessage(
        r"^The config attributes \{'block_out_channels': [\[(][^\])]*[\])]\} were passed to AutoencoderTiny,"),
}


@contextmanager
def dropping(logger: str, pattern: str) -> Iterator[None]:
    """Within the block, drop `logger`'s records whose message `pattern` finds: a notice the caller knows is
    harmless there (and only there)."""
    drop = _DropMessage(pattern)
    logging.getLogger(logger).addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(drop)


def quiet_third_party() -> None:
    """Silence known-harmless notices; off a terminal, also the libraries' own progress bars (their `\\r`
    redraws fill a log file). Idempotent."""
    for name, drop in _FILTERS.items():
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)
    if sys.stderr.isatty():
        return
    # Read when these libraries are imported (transformers follows huggingface_hub's switch); a value the
    # user set wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for module, switch in (("huggingface_hub.utils", "disable_progress_bars"),
                           ("transformers.utils.logging", "disable_progress_bar"),
                           ("diffusers.utils.logging", "disable_progress_bar")):
        if module in sys.modules:  # already imported: the environment is read too late for it
            getattr(sys.modules[module], switch)()


# ---------------------------------------------------------------------------------------------
# Progress

PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class PlainProgress:
    """tqdm's `update` / `set_postfix` / `close`, as one plain line every `every` seconds and at the end."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it", every: float = 30.0, file=None):
        self.total, self.desc, self.initial, self.n, self.unit, self.every = total, desc, initial, initial, unit, every
        self.file = file or sys.stderr
        self.postfix: str | None = None
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        self._line()

    def _line(self) -> None:
        from tqdm import tqdm

        self.last = time.monotonic()
        print(tqdm.format_meter(self.n, self.total, self.last - self.start, prefix=self.desc, unit=self.unit,
                                postfix=self.postfix, initial=self.initial, bar_format=PLAIN_FORMAT),
              file=self.file, flush=True)


def progress(total: int, desc: str, initial: int = 0, unit: str = "it", disable: bool = False,
             every: float = 30.0, file=None):
    """A progress bar: tqdm on a terminal; in a log file or a pipe, where tqdm's `\\r` redraws pile up
    on one line, a plain line every `every` seconds and at the end (`PlainProgress`)."""
    file = file or sys.stderr
    if disable or file.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=file)
    return PlainProgress(total, desc, initial, unit, every, file)
