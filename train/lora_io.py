"""LoRA conversion for stable-diffusion.cpp: train/convert_lora.py; this older path only says so (exit 2)."""

from sdkd.cli.errors import moved

if __name__ == "__main__":
    moved("python train/convert_lora.py")
