"""train/engine/console.py: progress off a terminal, and the third-party notices it silences (only those)."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from sdkd.train.engine import console

from conftest import save_toy_student


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_prints_plain_lines():
    file = io.StringIO()
    bar = console.progress(3, "train", unit="step", every=0, file=file)
    for step in range(3):
        bar.update(1)
        bar.set_postfix(loss=f"{0.5 / (step + 1):.4f}")
    bar.close()
    lines = file.getvalue().splitlines()
    assert "\r" not in file.getvalue() and len(lines) == 4  # a line per update (every=0) and one at the end
    assert lines[0].startswith("train: 1/3 (33%)")
    assert lines[-1].startswith("train: 3/3 (100%)") and lines[-1].endswith("/s, loss=0.1667]")


def test_progress_resumed_prints_once_per_interval_and_at_the_end():
    file = io.StringIO()
    bar = console.progress(10, "train", initial=6, every=3600, file=file)
    for _ in range(4):
        bar.update(1)
    bar.close()
    assert file.getvalue().splitlines() == [file.getvalue().strip()]
    assert file.getvalue().startswith("train: 10/10 (100%)")


def test_progress_on_a_terminal_is_tqdm():
    from tqdm import tqdm

    bar = console.progress(3, "train", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


@pytest.mark.parametrize("logger, message, shown", [
    ("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision (not installed); falling back",
     False),
    ("transformers.utils.import_utils", "some other notice", True),
    ("diffusers.models.modeling_utils", "There are modules in UNet2DConditionModel that should be kept in float32: [].",
     False),
    ("diffusers.models.modeling_utils", "There are modules in X that should be kept in float32: ['norm'].", True),
    ("diffusers.configuration_utils", "The config attributes {'block_out_channels': [64, 64]} were passed to "
     "AutoencoderTiny, but are not expected and will be ignored.", False),
    ("diffusers.configuration_utils", "The config attributes {'block_out_channels': [64, 64], 'colour': 1} were "
     "passed to AutoencoderTiny, but are not expected and will be ignored.", True),
    ("diffusers.configuration_utils", "The config attributes {'block_out_channels': [64, 64]} were passed to "
     "AutoencoderTinyXL, but are not expected and will be ignored.", True),
    ("diffusers.configuration_utils", "The config attributes {'block_out_channels': [64]} were passed to "
     "UNet2DModel, but are not expected and will be ignored.", True),
])
def test_only_the_known_notices_are_dropped(logger, message, shown):
    console.quiet_third_party()
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        log.warning(message)
    finally:
        log.removeHandler(handler)
    assert bool(seen) == shown


def test_an_fp16_file_loads_on_cpu_without_dtype_warnings(tmp_path):
    # An fp16 export runs on CPU in fp32: diffusers' "fp16 cannot run on cpu" and empty "kept in float32"
    # warnings do not apply.
    from sdkd.eval.inference.pipeline import load_pipeline
    from sdkd.train import export as E

    student = save_toy_student(tmp_path / "student", "bk_tiny")
    file = E.export(str(student), "single-file", str(tmp_path / "half.safetensors"), half=True)
    loaded = []
    assert diffusers_warnings(lambda: loaded.append(load_pipeline(file, device="cpu"))) == []
    assert loaded[0].unet.dtype == torch.float32


def diffusers_warnings(action) -> list[str]:
    """The messages diffusers' loggers pass on while `action()` runs."""
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        action()
    finally:
        root.removeHandler(handler)
    return [r.getMessage() for r in seen]


@pytest.mark.slow  # seconds of its own: the full suite runs it
def test_a_tiny_decoder_and_a_unet_lora_load_without_library_warnings(tmp_path, toy_teacher_dir):
    from diffusers import AutoencoderTiny

    from sdkd.eval.inference.pipeline import load_pipeline
    from sdkd.train.formats import lora_io
    from sdkd.train.formats.lora_config import LoraSection
    from sdkd.train.models.students import PRESETS, student_unet_config
    from sdkd.train.models.toy import TOY_VAE, TOY_XL_DEPTHS_UNET, build_random_pipeline, build_toy_pipeline
    from sdkd.train.tasks.decoder import export_tiny_decoder, load_tiny_vae, tiny_vae_config

    console.quiet_third_party()
    tiny = tiny_vae_config(TOY_VAE, 8)
    folder, taesd = export_tiny_decoder(AutoencoderTiny(**tiny), tmp_path, encoder_from=None)
    for path in (folder, taesd):  # sdkd's export, its folder and its TAESD file (config in its metadata)
        assert diffusers_warnings(lambda path=path: load_tiny_vae(str(path), TOY_VAE)) == []
    pipe = build_toy_pipeline()
    lora_io.add_adapters(pipe.unet, None, LoraSection(rank=4))
    lora = lora_io.save_lora(tmp_path / "sd", pipe.unet, None)
    # What eval/sample.py --tiny-vae --lora loads.
    assert diffusers_warnings(lambda: load_pipeline(toy_teacher_dir, "cpu", tiny_vae=folder, lora=lora)) == []
    # Another unexpected key is still reported (more cases in test_only_the_known_notices_are_dropped).
    assert "{'colour': 1} were passed to AutoencoderTiny" in "".join(
        diffusers_warnings(lambda: AutoencoderTiny.from_config({**tiny, "colour": 1})))

    def xl():
        return build_random_pipeline(student_unet_config(TOY_XL_DEPTHS_UNET, PRESETS["koala_700m"]), widths="toy_xl")

    trained = xl()
    lora_io.add_adapters(trained.unet, None, LoraSection(rank=4))
    lora = lora_io.save_lora(tmp_path / "sdxl", trained.unet, None)
    assert diffusers_warnings(lambda: lora_io.load_lora(xl(), lora)) == []  # two text encoders, tensors for neither
    # Only within the load: the notice is not silenced for good.
    lora_logger = logging.getLogger("diffusers.loaders.lora_base")
    assert diffusers_warnings(lambda: lora_logger.warning(
        "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")) != []
