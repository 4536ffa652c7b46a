"""Weight fingerprints (train/formats/fingerprint.py), which caches are keyed by: the same weights give the same
fingerprint wherever they are, and any changed weight gives another."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from sdkd.train.formats.fingerprint import files_fingerprint, module_fingerprint, teacher_fingerprint
from sdkd.train.models.toy import build_toy_pipeline


def test_module_fingerprint_follows_the_weights_not_the_object():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert module_fingerprint(a) == module_fingerprint(b) and len(module_fingerprint(a)) == 16
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert module_fingerprint(a) != module_fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert module_fingerprint(a) != module_fingerprint(b.to(torch.float16))  # the dtype counts
    assert module_fingerprint(torch.nn.Linear(2, 3)) != module_fingerprint(torch.nn.Linear(3, 2))
    half = torch.nn.Linear(3, 2).to(torch.bfloat16)  # no numpy dtype: hashed as bytes
    assert module_fingerprint(half) == module_fingerprint(half)


def test_teacher_fingerprint_covers_the_unet_and_the_text_encoder():
    pipe = build_toy_pipeline()
    before = teacher_fingerprint(pipe.unet, pipe)
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).add_(0.1)
    after_encoder = teacher_fingerprint(pipe.unet, pipe)
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.1)
    after_unet = teacher_fingerprint(pipe.unet, pipe)
    assert len({before, after_encoder, after_unet}) == 3
    with torch.no_grad():
        next(pipe.vae.parameters()).add_(0.1)  # the VAE makes no latent of the teacher's: not part of it
    assert teacher_fingerprint(pipe.unet, pipe) == after_unet


def test_files_fingerprint_is_of_the_bytes_not_the_path(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file({"w": torch.arange(6.0)}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text("{}")  # not weights: not counted
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "vae")
    first = files_fingerprint(folder)
    assert files_fingerprint(moved) == first
    (moved / "config.json").write_text('{"changed": 1}')
    assert files_fingerprint(moved) == first
    weights = moved / "diffusion_pytorch_model.safetensors"
    save_file({"w": load_file(str(weights))["w"] + 1}, str(weights))  # the same size, other bytes
    assert files_fingerprint(moved) != first
    assert files_fingerprint(weights) == files_fingerprint(moved)  # a file given alone: itself
    assert files_fingerprint(tmp_path / "nothing") == files_fingerprint(tmp_path / "nothing_either")
