"""Turn a student U-Net into a one-step generator: SDXS's stage 3 (arXiv 2403.16627 sec. 3.2), in the form
DMD2 (arXiv 2405.14867) publishes, whose training scheme SDXS's authors call identical.

    accelerate launch train/one_step.py --config configs/sdxs_one_step.yaml [key=value ...]

The student (`model`: a KD run's student/ folder; null: cut from the teacher by `student.preset`) maps
pure noise, read as x_T at t = T-1, to an epsilon prediction and so to clean latents x0 in one step.

1. ODE pairs (eq. 10): for `pairs.count` prompts (the captions of `data`, or `pairs.prompt_file`) the
   frozen teacher solves from fixed noise with `pairs.steps` DPM-Solver++ (or DDIM) steps at
   `pairs.guidance_scale`; made once, cached (`pairs.cache`), reused while the settings match. A
   held-out set (`pairs.eval_count`, the `sample.prompts`, other noise) measures progress.
2. Warm-up (`distill.warmup_steps`): the student alone, on L_FM = Σ_l w_l (1 - SSIM) between feature
   maps of its one-step output and of the teacher's ODE output for the same noise (`fm.extractor`: the
   teacher U-Net's encoder by default; VGG or DINOv2 from local weights).
3. Segmented score distillation (eq. 11, Algorithm 1): an online ("fake") score model starts as the
   offline frozen teacher (`online.kind`: a full copy, or a LoRA on the teacher's U-Net switched off for
   the teacher's own predictions, as SwiftBrush: two U-Nets in memory instead of three) and learns the
   student's samples with the diffusion loss every step; every `distill.student_every`-th step the student
   gets DMD2's normalised score difference (real: the teacher with CFG `distill.real_guidance_scale`;
   fake: the online model) at t ~ U[t_min T, α T], plus λ_FM L_FM in place of the high-noise segment.
   α and λ_FM fall linearly (`distill.alpha`, `distill.lambda_fm`). Optional: DMD2's classifier head on
   the online model's bottleneck, an adversarial term (`gan.weight`, off by default).

`eval.every`: on the held-out pairs, the latent MSE (`eval/ode_mse`), L_FM (`eval/fm`) and image PSNR
(`eval/psnr`) of the one-step student against the teacher's multi-step output. Writes OUTPUT/student/, a
diffusers pipeline folder that samples in one step (scheduler timesteps "trailing": t = 999), with the
teacher's text encoder and the decoder of `decoder` (null: the teacher's VAE; an AutoencoderTiny folder
or TAESD .safetensors, e.g. a train/tiny_decoder.py run's OUTPUT/tiny_decoder).
"""

from __future__ import annotations

from sdkd.train.engine.trainer_cli import run_trainer
from sdkd.train.tasks.one_step_config import OneStepConfig

SCHEMA = OneStepConfig


def build(cfg: OneStepConfig, acc):
    # Imported here, after the arguments are read: --help and launch.sh's config check stay fast.
    from sdkd.train.tasks.one_step import build_one_step_task

    return build_one_step_task(cfg, acc)


if __name__ == "__main__":
    run_trainer(SCHEMA, build, __doc__, __file__)
