"""The toy run for stable-diffusion.cpp (docs/export.md): its commands and cyllama snippet, run as written.

Two substitutions: a random-weight teacher of SD-1.5 widths (saved locally, in fp16: half the bytes to
write and read) for the SD-1.5 download, and a temporary folder for runs/toy_sdcpp; the training command
gets overrides for two quick steps (of one sample: SD-1.5 widths take seconds per sample on a CPU).
`sd` (stable-diffusion.cpp's CLI) is run as cyllama's `python -m cyllama.sd txt2img`, same flags.
"""

from __future__ import annotations

import gc
import re
import shlex
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, accelerate_launch, run_script

SECTION = "## Running an export in stable-diffusion.cpp"
TEACHER, RUN = "stable-diffusion-v1-5/stable-diffusion-v1-5", "runs/toy_sdcpp"
QUICK = ["train.max_steps=2", "train.batch_size=1", "train.sample_every=0"]


def toy_sdcpp_blocks() -> tuple[list[str], str]:
    """(the commands of docs/export.md's block that trains the toy student, the cyllama snippet)."""
    section = (ROOT / "docs" / "export.md").read_text().split(SECTION)[1].split("\n## ")[0]
    (commands,) = [b for b in re.findall(r"```bash\n(.+?)\n```", section, re.S) if "train/kd.py" in b]
    (snippet,) = re.findall(r"```python\n(.+?)\n```", section, re.S)
    return commands.splitlines(), snippet


def test_readme_toy_commands_target_a_layout_sdcpp_runs():
    commands, snippet = toy_sdcpp_blocks()
    assert [c.split()[:2] for c in commands] == [["accelerate", "launch"], ["python", "train/export.py"],
                                                 ["sd", "-m"]]
    assert "student.preset=bk_tiny" in commands[0] and "--target sdcpp" in commands[1]
    assert "from cyllama import sd" in snippet


@pytest.mark.sd15
@pytest.mark.e2e
def test_readme_toy_student_generates_in_stable_diffusion_cpp(tmp_path):
    pytest.importorskip("cyllama.sd", reason="cyllama (stable-diffusion.cpp binding) not installed: "
                                             "pip install -e '.[sdcpp]'")
    from sdkd.train.models.sd_configs import SD15_UNET
    from sdkd.train.models.toy import build_random_pipeline

    teacher = build_random_pipeline(SD15_UNET, widths="sd15", dtype=torch.float16)  # the trainer casts it to fp32
    teacher.save_pretrained(tmp_path / "sd15", safe_serialization=True)
    del teacher
    gc.collect()
    commands, snippet = toy_sdcpp_blocks()
    local = lambda text: text.replace(TEACHER, str(tmp_path / "sd15")).replace(RUN, str(tmp_path / "run"))  # noqa: E731
    for command in commands:
        args = shlex.split(local(command))
        if args[:2] == ["accelerate", "launch"]:
            r = accelerate_launch(args[2:] + QUICK)
        elif args[0] == "sd":
            r = run_script([sys.executable, "-m", "cyllama.sd", "txt2img", *args[1:]])
        else:
            r = run_script([sys.executable, *args[1:]])
        assert r.returncode == 0, command + "\n" + r.stdout[-2000:] + r.stderr[-3000:]
    exec(compile(local(snippet), "docs/export.md", "exec"), {})
    for name in ("sd.png", "cyllama.png"):
        pixels = np.asarray(Image.open(tmp_path / "run" / name))
        assert pixels.shape[:2] == (64, 64) and pixels.std() > 0  # a picture, not a blank
