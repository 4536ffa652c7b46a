"""One way to name a model (train/models/names.py): every command that takes a model takes `toy`, a run folder,
a checkpoint folder, a diffusers folder, an sdkd single file and a hub id, and a hub id that is neither cached nor
reachable stops each command in one line with nothing written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sdkd.cli.errors import UserError
from sdkd.train.models.names import resolve_model

from conftest import free_port, run_in_process, run_script

FORMS = ("toy", "diffusers", "run", "checkpoint", "file")
HUB_ID = "sdkd-tests/no-such-model"


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, str]:
    """Each form, all holding the trained toy teacher's U-Net: the toy name, its committed pipeline folder, a run
    folder with only a checkpoint (its other parts come from the run's teacher, toy), that checkpoint, and an sdkd
    single file exported from the toy teacher."""
    from sdkd.train.formats.model_files import export_single_file, load_source
    from sdkd.train.models.toy import toy_teacher_folder

    root = tmp_path_factory.mktemp("forms")
    run = root / "run"
    shutil.copytree(toy_teacher_folder() / "unet", run / "checkpoint-1" / "unet")
    (run / "checkpoint-1" / "trainer_state.json").write_text('{"step": 1, "files": {}}')
    (run / "config.yaml").write_text(f"teacher: toy\noutput_dir: {run}\n")
    file = export_single_file(load_source("toy"), root / "toy.safetensors")
    return {"toy": "toy", "diffusers": str(toy_teacher_folder()), "run": str(run),
            "checkpoint": str(run / "checkpoint-1"), "file": str(file)}


@pytest.fixture(scope="module")
def toy_conv_in() -> torch.Tensor:
    from diffusers import UNet2DConditionModel

    from sdkd.train.models.toy import toy_teacher_folder

    return UNet2DConditionModel.from_pretrained(toy_teacher_folder() / "unet").conv_in.weight.detach()


def test_each_form_resolves_to_its_kind_without_loading(forms):
    kinds = {form: resolve_model(name).kind for form, name in forms.items()}
    assert kinds == {"toy": "toy", "diffusers": "diffusers", "run": "run", "checkpoint": "checkpoint", "file": "file"}


def test_what_is_no_model_is_refused_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "pipeline" / "unet").mkdir(parents=True)
    (tmp_path / "pipeline" / "vae").mkdir()  # a pipeline folder that lost its model_index.json: no checkpoint
    for name, message in ((tmp_path / "notes.txt", "is not a .safetensors file"),
                          (tmp_path / "pipeline", "is not a run folder"),
                          (tmp_path / "gone", "not found: expected a run folder"), ("", "is empty")):
        with pytest.raises(UserError, match=rf"teacher{' ' if name else ''}'?{name}'?.*{message}"):
            resolve_model(name, "teacher")


@pytest.mark.slow  # every form loaded by every loader: about 20 s
@pytest.mark.parametrize("form", FORMS)
def test_every_loader_takes_every_form(forms, form, toy_conv_in, tmp_path):
    """From every form, the trainers' loader (`load_parts`, with a DDPM training scheduler), evaluate's teacher, the
    demo and export each load the toy teacher's U-Net (its conv_in weight compared); evaluate's targets resolve to
    the form (a run to its checkpoint), and eval/sample.py runs on it."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sdkd.eval.evaluation.targets import TeacherSpec, load_teacher_model, resolve_targets
    from sdkd.eval.page.models import load_model
    from sdkd.train.formats.model_files import load_parts

    name = forms[form]
    parts = load_parts(name)
    assert isinstance(parts.scheduler, DDPMScheduler)
    torch.testing.assert_close(parts.unet.conv_in.weight, toy_conv_in)
    teacher = load_teacher_model(TeacherSpec(name), "cpu", "fp32")
    torch.testing.assert_close(teacher.unet.conv_in.weight, toy_conv_in)
    targets = resolve_targets(name)
    assert [t.path for t in targets] == [forms["checkpoint"] if form == "run" else name]
    demo = load_model("m", name, tmp_path, device="cpu")
    torch.testing.assert_close(demo.pipe.unet.conv_in.weight, toy_conv_in)

    assert run_in_process("eval/sample.py", ["--model", name, "--prompt", "a red circle", "--steps", "1",
                                             "--out", str(tmp_path / "samples")]) == 0
    assert json.loads((tmp_path / "samples" / "samples.json").read_text())["model"] == name
    assert run_in_process("train/export.py", [name, "--format", "diffusers", "--out", str(tmp_path / "export")]) == 0
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet")
    torch.testing.assert_close(exported.conv_in.weight, toy_conv_in)


@pytest.mark.parametrize("form", FORMS)
def test_show_student_reads_the_unet_config_of_every_form(forms, form):
    from sdkd.train.models.students import count_params
    from sdkd.train.models.toy import toy_teacher_folder
    from sdkd.train.show_student import _read_teacher_config

    config = _read_teacher_config(forms[form])
    teacher = json.loads((toy_teacher_folder() / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == teacher["block_out_channels"]
    assert count_params(config) == count_params(teacher)


@pytest.mark.slow  # a 2-step run
def test_a_trainer_distils_from_a_single_file_teacher(forms, tmp_path):
    from conftest import ROOT

    out = tmp_path / "run"
    assert run_in_process("train/kd.py", ["--config", str(ROOT / "configs" / "toy.yaml"), f"teacher={forms['file']}",
                                          f"output_dir={out}", "train.max_steps=2", "train.sample_every=0",
                                          "log.trackers=[none]", "data.num_samples=4", "train.batch_size=2"]) == 0
    assert (out / "student" / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------------
# A hub id that is not cached, with the hub unreachable or switched off


@pytest.fixture(params=["unreachable", "offline"])
def no_hub(request, monkeypatch, tmp_path):
    """An empty hub cache, and the hub at a closed port on this machine (HF_HUB_OFFLINE unset) or switched off
    (HF_HUB_OFFLINE); the case runs in an empty folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", request.param == "offline")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return request.param


HUB_COMMANDS = {
    "sample": ("eval/sample.py", ["--model", HUB_ID, "--prompt", "x", "--out", "samples"], "model"),
    "export": ("train/export.py", [HUB_ID, "--format", "diffusers", "--out", "export"], "model"),
    "evaluate": ("eval/evaluate.py", [HUB_ID, "--out", "eval"], "model"),
    "evaluate-teacher": ("eval/evaluate.py", ["toy", "--teacher", HUB_ID, "--out", "eval"], "--teacher"),
    "kd": ("train/kd.py", [f"teacher={HUB_ID}", "output_dir=run"], "teacher"),
    "finetune": ("train/finetune.py", [f"model={HUB_ID}", "output_dir=run"], "model"),
    "show-student": ("train/show_student.py", ["--teacher", HUB_ID, "--preset", "bk_small"], "--teacher"),
}


@pytest.mark.parametrize("command", HUB_COMMANDS)
def test_a_hub_id_without_the_hub_is_one_line_and_writes_nothing(no_hub, command, capfd):
    script, argv, key = HUB_COMMANDS[command]
    assert run_in_process(script, argv) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {key} '{HUB_ID}': not a local file or folder"), err
    assert ("HF_HUB_OFFLINE is set" if no_hub == "offline" else "cannot be reached (offline?)") in err
    assert "give a local diffusers folder" in err
    assert list(Path.cwd().iterdir()) == []


@pytest.mark.slow  # a new Python process
def test_the_hub_at_a_closed_port_answers_at_once_in_a_real_process(tmp_path):
    """The real command, HF_HUB_OFFLINE unset, against a closed port: exit 2 within the 60 s timeout, one line, and
    nothing left in its working folder."""
    env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HUB_CACHE": str(tmp_path / "cache")}
    work = tmp_path / "work"
    work.mkdir()
    from conftest import ROOT

    result = run_script([sys.executable, str(ROOT / "eval" / "sample.py"), "--model", HUB_ID, "--prompt", "x",
                         "--out", "samples"], cwd=work, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "the Hugging Face hub cannot be reached" in result.stderr
    assert list(work.iterdir()) == []
