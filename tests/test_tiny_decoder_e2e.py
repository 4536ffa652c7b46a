"""End to end: `accelerate launch train/tiny_decoder.py` on the toy world (a random-weight toy teacher on disk),
as a user runs it: PSNR against the teacher decoder rises, the adversarial term changes the result, resume is
bit-identical with both modules, the export decodes in diffusers and in sdkd's pipeline, a cache of teacher
samples trains; `decoder.init` reads both export formats. stable-diffusion.cpp reads the TAESD file of an
SD-1.5-layout decoder (marked sd15).

The runs are tiny (16 steps of batch 8 at 32 px) and use one CPU thread each: on a small shared machine
OpenMP threads mostly wait for each other at these sizes.
"""

from __future__ import annotations

import gc
import json
import shlex
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdkd.cli.errors import UserError
from sdkd.train.models.toy import TOY_VAE
from sdkd.train.tasks.decoder import (
    TAESD_FILE,
    UNTRAINED,
    export_tiny_decoder,
    load_tiny_vae,
    sdcpp_problems,
    tiny_vae_config,
)

from conftest import launch_trainer, run_script, same_state

pytestmark = pytest.mark.e2e

SCRIPT, CONFIG = "train/tiny_decoder.py", "configs/toy_decoder.yaml"
STEPS, HALF = 16, 8
TIMING = ("sec_per_step", "samples_per_sec")


@pytest.fixture(scope="module", autouse=True)
def one_thread_runs():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def common(teacher) -> list[str]:
    # Cosine LR: the schedules' state matters for resume. The same seed for every run.
    return [f"teacher={teacher}", f"train.max_steps={STEPS}", "data.num_samples=72", "optim.lr_scheduler=cosine",
            f"eval.every={HALF}"]


GAN = ["gan.weight=0.5", "gan.adaptive=true", "gan.start=2", "gan.every=2", "train.sample_every=0",
       f"train.checkpoint_every={HALF}", "log.trackers=[none]"]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def l1_run(tmp_path_factory, toy_teacher_dir):
    """L1 only (no discriminator), with grids and tensorboard."""
    out = tmp_path_factory.mktemp("l1_run")
    result = launch_trainer(SCRIPT, CONFIG, out, *common(toy_teacher_dir), "gan.weight=0",
                            f"train.sample_every={HALF}", "train.checkpoint_every=0")
    return out, result


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory, toy_teacher_dir):
    """The same seed with the adversarial term (adaptive weight) from step 2, the discriminator every 2nd step."""
    out = tmp_path_factory.mktemp("gan_run")
    launch_trainer(SCRIPT, CONFIG, out, *common(toy_teacher_dir), *GAN)
    return out


# ---------------------------------------------------------------------------------------------------
# Training


def test_psnr_against_the_teacher_decoder_rises(l1_run):
    out, result = l1_run
    evals = {line["step"]: line for line in metrics(out) if "eval/psnr" in line}
    assert sorted(evals) == [0, HALF, STEPS]  # step 0, every eval.every and the last
    psnr = [evals[s]["eval/psnr"] for s in (0, HALF, STEPS)]
    assert psnr[-1] > psnr[0] + 3.0, psnr
    assert all(0.0 <= evals[s]["eval/ssim"] <= 1.0 for s in evals)
    assert evals[STEPS]["eval/ssim"] > evals[0]["eval/ssim"]
    # Every loss term on its own line; no discriminator terms without a discriminator.
    last = metrics(out)[-1]
    assert {"l1_down", "loss", "lr"} <= set(last) and not {"disc_loss", "adversarial"} & set(last)
    # Tensorboard gets the final PSNR the metrics file has; a grid file at each sample step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("eval/psnr")}
    assert logged[STEPS] == pytest.approx(evals[STEPS]["eval/psnr"], rel=1e-5)
    assert (out / "samples" / f"step-{HALF}.png").is_file() and (out / "samples" / f"step-{STEPS}.png").is_file()
    # The final figures are in the model card, which says the encoder was never trained.
    card = (out / "tiny_decoder" / "README.md").read_text()
    assert f"| encoder | {UNTRAINED} |" in card and f"(step {STEPS}, 8 held-out latents)" in card
    assert f"{evals[STEPS]['eval/psnr']:.2f} dB" in card
    assert f"encoder {UNTRAINED}, left out of {TAESD_FILE}" in result.stdout


def test_adversarial_term_runs_its_discriminator_on_schedule_and_changes_the_decoder(l1_run, gan_run):
    l1, gan = metrics(l1_run[0]), metrics(gan_run)
    by_step = {line["step"]: line for line in gan if "l1_down" in line}
    disc = {s: line["disc_loss"] for s, line in by_step.items() if "disc_loss" in line}
    assert sorted(disc) == [3, 5, 7, 9, 11, 13, 15]  # 0-based steps 2, 4, ... (gan.start=2, gan.every=2)
    # A loss per batch (that the discriminator learns from it: tests/test_decoder.py).
    assert len({round(v, 6) for v in disc.values()}) == len(disc), disc
    assert all("adversarial" in by_step[s] for s in range(3, STEPS + 1))
    assert "adversarial" not in by_step[1] and "adversarial" not in by_step[2]
    weights = [by_step[s]["adversarial_weight"] for s in range(3, STEPS + 1)]  # adaptive: 0.5 x a gradient ratio
    assert len(set(weights)) > 1 and all(w > 0 for w in weights)
    # Its own learning rate (gan.lr 2e-4), its cosine schedule counting only its own updates.
    lr = {s: by_step[s]["lr/discriminator"] for s in (1, 3, STEPS)}
    assert lr[1] == pytest.approx(2.0e-4) and lr[1] > lr[3] > lr[STEPS] and by_step[1]["lr/decoder"] > 9e-4
    # The same seed: identical until the adversarial term starts, different after.
    l1_by_step = {line["step"]: line for line in l1 if "l1_down" in line}
    assert [l1_by_step[s]["l1_down"] for s in (1, 2)] == [by_step[s]["l1_down"] for s in (1, 2)]
    a = load_file(l1_run[0] / "tiny_decoder" / "diffusion_pytorch_model.safetensors")
    b = load_file(gan_run / "tiny_decoder" / "diffusion_pytorch_model.safetensors")
    decoder = [k for k in a if k.startswith("decoder.")]
    assert max((a[k] - b[k]).abs().max().item() for k in decoder) > 1e-4
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))  # never trained


def test_resume_is_bit_identical_with_both_modules(gan_run, tmp_path, toy_teacher_dir):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(gan_run / f"checkpoint-{HALF}", resumed / f"checkpoint-{HALF}")
    result = launch_trainer(SCRIPT, CONFIG, resumed, *common(toy_teacher_dir), *GAN, "resume=latest")
    assert f"resumed from {resumed / f'checkpoint-{HALF}'} at step {HALF}" in result.stdout + result.stderr
    full, again = gan_run / f"checkpoint-{STEPS}", resumed / f"checkpoint-{STEPS}"
    for name in ("decoder/diffusion_pytorch_model.safetensors", "discriminator.safetensors",
                 "generator-0.safetensors"):
        assert same_state(load_file(full / name), load_file(again / name)), name
    for name in ("optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin"):  # decoder, discriminator
        assert same_state(torch.load(full / name, weights_only=True), torch.load(again / name, weights_only=True)), name
    # The alternation continues where it stopped: the same terms at the same steps, bit for bit.
    before = [{k: v for k, v in line.items() if k not in TIMING} for line in metrics(gan_run)
              if line["step"] > HALF]
    after = [{k: v for k, v in line.items() if k not in TIMING} for line in metrics(resumed)]
    assert [line["step"] for line in after] == list(range(HALF + 1, STEPS + 1))
    assert after == before


# ---------------------------------------------------------------------------------------------------
# Export


def test_export_files(l1_run):
    out, _ = l1_run
    vae = AutoencoderTiny.from_pretrained(out / "tiny_decoder")
    assert vae.config.upsample_fn == "nearest" and vae.config.scaling_factor == 1.0
    taesd = load_file(out / TAESD_FILE)
    # Decoder only (its encoder is untrained), the folder's tensors under the same names.
    assert taesd and all(k.startswith("decoder.") for k in taesd)
    folder = vae.state_dict()
    assert all(torch.equal(t, folder[k]) for k, t in taesd.items())
    with safe_open(str(out / TAESD_FILE), "pt") as f:
        assert json.loads(f.metadata()["config"])["decoder_block_out_channels"] == [16, 16]
    # The toy layout is no TAESD layout: the run says so and names no sd.cpp command.
    assert sdcpp_problems(vae.config) and "--taesd" not in l1_run[1].stdout


def test_exported_folder_decodes_as_the_vae_of_a_diffusers_pipeline(l1_run, toy_teacher_dir):
    out, _ = l1_run
    tiny = AutoencoderTiny.from_pretrained(out / "tiny_decoder")
    pipe = StableDiffusionPipeline.from_pretrained(toy_teacher_dir, vae=tiny, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red circle"], num_inference_steps=2, height=32, width=32)
    latents = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    images = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    with torch.no_grad():
        expected = (tiny.decode(latents).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == (1, 32, 32, 3) and np.allclose(images, expected, atol=1e-5)


def test_the_printed_sample_command_decodes_with_the_tiny_decoder(l1_run, tmp_path):
    out, result = l1_run
    (line,) = [c for c in result.stdout.splitlines() if "eval/sample.py" in c and "--tiny-vae" in c]
    args = shlex.split(line.split("  #")[0])
    assert args[:2] == ["python", "eval/sample.py"] and str(out / "tiny_decoder") in args
    args[args.index("--out") + 1] = str(tmp_path / "generated")
    r = run_script([sys.executable, *args[1:], "--steps", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "generated" / "samples.json").read_text())
    assert record["tiny_vae"] == str(out / "tiny_decoder") and record["steps"] == 2
    assert (tmp_path / "generated" / "image-000.png").is_file()


def test_decoder_init_reads_the_folder_and_the_taesd_file(l1_run, tmp_path, toy_teacher_dir):
    out, _ = l1_run
    exported = AutoencoderTiny.from_pretrained(out / "tiny_decoder").state_dict()
    from_folder, encoder = load_tiny_vae(str(out / "tiny_decoder"), TOY_VAE)
    assert encoder is None  # its card says the encoder is untrained: not passed on as a trained one
    assert same_state(from_folder.state_dict(), exported)
    from_file, encoder = load_tiny_vae(str(out / TAESD_FILE), TOY_VAE)  # decoder only, width 16 from metadata
    assert encoder is None
    assert all(torch.equal(t, exported[k]) for k, t in from_file.state_dict().items() if k.startswith("decoder."))
    # A TAESD-format file with an encoder and no metadata (as madebyollin/taesd's diffusers file): width inferred.
    torch.manual_seed(1)
    full = AutoencoderTiny(**tiny_vae_config(TOY_VAE, 16))
    save_file(full.state_dict(), str(tmp_path / "taesd_full.safetensors"))
    loaded, encoder = load_tiny_vae(str(tmp_path / "taesd_full.safetensors"), TOY_VAE)
    assert encoder and same_state(loaded.state_dict(), full.state_dict())
    # Exported again, an encoder that came from decoder.init goes into the TAESD file too (img2img in sd.cpp).
    _, taesd = export_tiny_decoder(loaded, tmp_path / "again", encoder_from=encoder)
    assert {k.split(".")[0] for k in load_file(taesd)} == {"decoder", "encoder"}
    # A folder of another layout (the 8x TAESD one for the toy's 2x VAE) stops with one line.
    AutoencoderTiny().save_pretrained(tmp_path / "taesd_sd")
    with pytest.raises(UserError, match="upsampled 8x; the teacher's VAE has 4 channels and downsamples 2x"):
        load_tiny_vae(str(tmp_path / "taesd_sd"), TOY_VAE)
    # A pipeline folder whose vae/ is an AutoencoderKL is refused, not filled at random.
    with pytest.raises(UserError, match="names AutoencoderKL"):
        load_tiny_vae(str(toy_teacher_dir), TOY_VAE)


def test_training_from_teacher_samples_in_a_latent_cache(tmp_path, toy_teacher_dir):
    cache = tmp_path / "cache"
    r = run_script([sys.executable, "train/cache_latents.py", "--config", CONFIG, "--from-samples",
                    "--sample-steps", "2", f"teacher={toy_teacher_dir}", "data.num_samples=12", f"data.cache={cache}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "next: accelerate launch train/tiny_decoder.py" in r.stdout
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["samples"] == 12 and manifest["latents"] == "teacher samples, 2 steps"
    shard = load_file(cache / manifest["shards"][0]["name"])
    # The sampled latents exactly: no posterior spread.
    assert torch.count_nonzero(shard["std"]) == 0 and shard["mean"].abs().sum() > 0
    # With every optional term: full-resolution L1 and L2, LPIPS (random VGG weights from a local file), the
    # non-saturating GAN loss.
    from sdkd.train.losses.perceptual import LpipsVgg

    lpips = tmp_path / "lpips_vgg.safetensors"
    save_file({k: v.contiguous() for k, v in LpipsVgg().state_dict().items()}, str(lpips))
    out = tmp_path / "run"
    launch_trainer(SCRIPT, CONFIG, out, f"teacher={toy_teacher_dir}", f"data.cache={cache}", "train.max_steps=4",
                   "decoder.eval_latents=4", "eval.every=4", "gan.start=0", "gan.loss=non_saturating",
                   "decoder.lambda_l1=0.5", "decoder.lambda_l2=0.5", "decoder.lambda_lpips=0.1",
                   f"decoder.lpips_weights={lpips}", "train.sample_every=0", "log.trackers=[none]")
    evals = [line for line in metrics(out) if "eval/psnr" in line]
    assert [line["step"] for line in evals] == [0, 4] and evals[1]["eval/psnr"] > evals[0]["eval/psnr"]
    last = metrics(out)[-1]
    assert {"l1_down", "l1", "l2", "lpips", "adversarial", "disc_loss", "disc_real", "disc_fake"} <= set(last)
    assert last["adversarial"] > 0  # softplus(-D(fake)): positive, unlike hinge's -D(fake)
    AutoencoderTiny.from_pretrained(out / "tiny_decoder")


# ---------------------------------------------------------------------------------------------------
# stable-diffusion.cpp


@pytest.mark.sd15
def test_sd15_taesd_export_decodes_in_stable_diffusion_cpp(tmp_path):
    """sd.cpp reads our TAESD file and decodes with it: the image differs from the KL VAE's and from a broken
    (zeroed) file's, and a decoder that outputs one colour renders exactly that colour."""
    sd = pytest.importorskip("cyllama.sd", reason="cyllama (stable-diffusion.cpp binding) not installed: "
                                                  "pip install -e '.[sdcpp]'")
    import sdkd.train.formats.model_files as E
    from sdkd.train.models.sd_configs import SD15_UNET
    from sdkd.train.models.toy import build_random_pipeline

    pipe = build_random_pipeline(SD15_UNET, widths="sd15")
    model = E.export_single_file(E.Source(pipe, "test"), tmp_path / "sd15.safetensors", target="sdcpp", half=True)
    del pipe
    gc.collect()
    torch.manual_seed(0)
    vae = AutoencoderTiny()
    assert sdcpp_problems(vae.config) == []
    folder, taesd = export_tiny_decoder(vae, tmp_path / "run", encoder_from=None)
    tensors = load_file(taesd)
    assert tensors and all(k.startswith("decoder.layers.") for k in tensors)
    broken = tmp_path / "zeroed.safetensors"
    save_file({k: torch.zeros_like(t) for k, t in tensors.items()}, str(broken))
    # Every weight zero but the last conv's bias: the decoder outputs that colour (diffusers: x * 2 - 1).
    colour = torch.tensor([0.25, 0.5, 0.75])
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        vae.decoder.layers[-1].bias.copy_(colour)
        assert torch.allclose(vae.decode(torch.randn(1, 4, 8, 8)).sample, colour.view(1, 3, 1, 1) * 2 - 1)
    _, flat = export_tiny_decoder(vae, tmp_path / "flat", encoder_from=None)

    logs = []
    sd.set_log_callback(lambda level, message: logs.append(str(message)))

    def generate(taesd_path=None):
        logs.clear()
        params = sd.SDContextParams(model_path=str(model), n_threads=2, vae_decode_only=True)
        if taesd_path is not None:
            params.taesd_path = str(taesd_path)
        with sd.SDContext(params) as ctx:
            gen = sd.SDImageGenParams(prompt="a red fox", width=64, height=64, seed=1, sample_steps=1, cfg_scale=1.0)
            image = ctx.generate_with_params(gen)[0].to_numpy().astype(np.float32)
        used_tae = any("using TAE for encoding / decoding" in m for m in logs)
        assert used_tae == (taesd_path is not None), logs[-20:]
        return image

    try:
        kl, tiny, zeroed, flat_image = generate(), generate(taesd), generate(broken), generate(flat)
    finally:
        sd.set_log_callback(None)
    assert tiny.shape == kl.shape == (64, 64, 3)
    assert np.abs(tiny - kl).mean() > 5 and np.abs(tiny - zeroed).mean() > 1, (np.abs(tiny - kl).mean(),
                                                                               np.abs(tiny - zeroed).mean())
    assert zeroed.max() == 0  # every weight zero: black, the file's values are what sd.cpp runs
    assert np.abs(flat_image - colour.numpy() * 255).max() <= 1.0, flat_image.reshape(-1, 3)[:2]
