"""Loading a pipeline's parts: weight variants (teacher_variant, model_variant) from a local folder, and
pickle weights refused unless allowed."""

import pytest
import torch

from sdkd.cli.errors import UserError
from sdkd.train.models.teacher import PipelineSource, load_teacher


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory):
    """The toy teacher's weights and, beside them, *.fp16.safetensors files holding those weights + 1."""
    from sdkd.train.models.toy import build_toy_pipeline

    folder = tmp_path_factory.mktemp("variant")
    pipe = build_toy_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    with torch.no_grad():
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in model.parameters():
                p.add_(1)
    pipe.save_pretrained(folder, safe_serialization=True, variant="fp16")
    return folder


def test_variant_loads_the_variant_files(variant_dir):
    for sub in ("unet", "vae"):
        assert (variant_dir / sub / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (variant_dir / "text_encoder" / "model.fp16.safetensors").is_file()
    fp16 = load_teacher(PipelineSource(str(variant_dir), variant="fp16"))
    plain = load_teacher(str(variant_dir))
    for name in ("unet", "vae", "text_encoder"):
        pairs = zip(fp16.components[name].parameters(), plain.components[name].parameters(), strict=True)
        assert all(torch.allclose(a, b + 1) for a, b in pairs), name


def test_missing_variant_is_one_line_naming_it(toy_teacher_dir):
    with pytest.raises(UserError) as err:
        load_teacher(PipelineSource(str(toy_teacher_dir), variant="fp16"), what="model")
    message = str(err.value)
    assert message.startswith(f"model '{toy_teacher_dir}' (model_variant=fp16) could not be loaded: ")
    assert "fp16" in message.split("could not be loaded")[1] and "\n" not in message


def test_source_of_the_config():
    from sdkd.train.tasks.diffusion_config import FinetuneConfig

    cfg = FinetuneConfig(teacher="t", teacher_variant="fp16", model="m", model_revision="v2", output_dir="o",
                         allow_pickle=True)
    assert PipelineSource.of(cfg) == PipelineSource("t", None, "fp16", True)
    assert PipelineSource.of(cfg, "model") == PipelineSource("m", "v2", None, True)


@pytest.fixture(scope="module")
def pickle_dir(tmp_path_factory):
    """The toy teacher with .bin (pickle) weights only, as old hub checkpoints are."""
    from safetensors.torch import load_file

    from sdkd.train.models.toy import build_toy_pipeline

    folder = tmp_path_factory.mktemp("pickled")
    build_toy_pipeline().save_pretrained(folder, safe_serialization=False)
    for st in folder.rglob("*.safetensors"):  # transformers 5 writes safetensors whatever it is asked
        torch.save(load_file(st), st.with_name("pytorch_model.bin"))
        st.unlink()
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not list(folder.rglob("*.safetensors"))
    return folder


def test_pickle_weights_are_refused_unless_allowed_by_name(pickle_dir, toy_teacher_dir):
    with pytest.raises(UserError, match=r"teacher '.*unet': weights only as pickle \(diffusion_pytorch_model.bin\)"
                                        r".*allow_pickle=true"):
        load_teacher(str(pickle_dir))
    with pytest.raises(UserError, match=r"'.*vae': weights only as pickle"):
        load_teacher(str(pickle_dir), with_unet=False)  # the check covers every part that loads
    allowed = load_teacher(PipelineSource(str(pickle_dir), allow_pickle=True))
    safe = load_teacher(str(toy_teacher_dir))  # the same seed-built toy, stored as safetensors
    assert all(torch.equal(a, b) for a, b in zip(allowed.unet.parameters(), safe.unet.parameters(), strict=True))


def test_toy_is_the_committed_trained_teacher(monkeypatch, tmp_path):
    # `toy` loads train/models/toy_teacher/ (made by train/make_toy_teacher.py); build_toy_pipeline stays the
    # random-weight builder of the same architecture, and the trained teacher kept its frozen text encoder.
    from safetensors.torch import load_file

    from sdkd.train.models import toy
    from sdkd.train.models.teacher import load_pipeline

    parts = load_teacher("toy")
    stored = load_file(toy.TOY_TEACHER / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, stored[k]) for k, v in parts.unet.state_dict().items())
    assert parts.unet.dtype == parts.vae.dtype == torch.float32
    random = toy.build_toy_pipeline()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(parts.unet.config) == public(random.unet.config)
    assert not torch.equal(parts.unet.conv_in.weight, random.unet.conv_in.weight)
    assert all(torch.equal(a, b) for a, b in zip(parts.components["text_encoder"].state_dict().values(),
                                                 random.text_encoder.state_dict().values(), strict=True))
    assert parts.vae.config.scaling_factor != random.vae.config.scaling_factor  # refitted by the VAE trainer
    # issue 21: it ships the scheduler sdkd samples with; the trainers take the DDPM one from the same config
    assert type(load_pipeline("toy").scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert type(parts.scheduler).__name__ == "DDPMScheduler"

    monkeypatch.setattr(toy, "TOY_TEACHER", tmp_path / "gone")
    with pytest.raises(UserError, match=r"the trained toy teacher is missing .*python train/make_toy_teacher.py"):
        load_teacher("toy")
