"""The latent cache: made by train/cache_latents.py (it runs the teacher's encoders); this older path only says
so (exit 2)."""

from sdkd.cli.errors import moved

if __name__ == "__main__":
    moved("python train/cache_latents.py")
