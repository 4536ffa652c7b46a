"""Teacher samples as a latent cache's contents: what `train/cache_latents.py --from-samples` stores."""

from __future__ import annotations

import torch

from sdkd.train.tasks.objective import BatchEncoder


class SampledLatents(BatchEncoder):
    """The latents the teacher pipeline samples for each caption, stored as a posterior of zero spread (so a
    trainer's draw returns them exactly): sample i uses seed + i, with DPM-Solver++ and `steps` steps."""

    def __init__(self, parts, steps: int, guidance_scale: float, resolution: int, seed: int):
        from diffusers import DPMSolverMultistepScheduler

        super().__init__(parts)
        scheduler = DPMSolverMultistepScheduler.from_config(parts.scheduler.config)
        self.pipe = parts.family.pipeline(parts, parts.unet, scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance_scale, self.resolution, self.next_seed = steps, guidance_scale, resolution, seed

    @torch.no_grad()
    def posterior(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.parts.unet.device
        generators = [torch.Generator(device).manual_seed(self.next_seed + i) for i in range(len(batch["captions"]))]
        self.next_seed += len(generators)
        latents = self.pipe(batch["captions"], num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                            height=self.resolution, width=self.resolution, generator=generators,
                            output_type="latent").images.float()
        mean = latents / self.vae.config.scaling_factor
        return mean, torch.zeros_like(mean)
