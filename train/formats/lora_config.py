"""The `lora` section: the adapter a LoRA run trains (train/lora.py) and lora_io.py puts on the U-Net and
text encoder; the one-step trainer's online LoRA is one too.

Nothing heavy is imported here: config loading and --help stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Section


@dataclass
class LoraSection(Section):
    rank: int = 16
    """LoRA rank r of every adapted layer."""
    alpha: Optional[float] = None
    """LoRA alpha (the update is scaled by alpha / rank); null: equal to rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """U-Net module names (or name suffixes) to adapt. The attention projections exist in every block-removed
    student that keeps attention (bk_base/small/tiny, SDXS); each entry must match at least one module."""
    train_text_encoder: bool = False
    """Also put a LoRA on the text encoder (then data.cache cannot be used: the text encoder runs each step)."""
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder module names (or suffixes) to adapt when train_text_encoder is set."""
    sdcpp: bool = True
    """Also write OUTPUT/lora_sdcpp.safetensors (kohya naming, teacher-slot LDM numbering, alpha tensors) for
    stable-diffusion.cpp when the model's layout runs there (teacher, bk_tiny, SDXS)."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.rank > 0, f"{at}.rank", "must be > 0")
        require(self.alpha is None or self.alpha > 0, f"{at}.alpha", "must be > 0 or null")
        require(0.0 <= self.dropout < 1.0, f"{at}.dropout", "must be in [0, 1)")
        require(bool(self.target_modules), f"{at}.target_modules", "at least one module name")
        require(not self.train_text_encoder or bool(self.text_encoder_target_modules),
                f"{at}.text_encoder_target_modules", "at least one module name")
