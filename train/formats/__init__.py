"""How weights go in and out of files: diffusers folders, single files and model cards (model_files.py), the original
LDM and stable-diffusion.cpp key layouts (ldm_layout.py), LoRA files in diffusers and kohya form (lora_io.py; the `lora`
config section, lora_config.py), reading third-party weight files safely (weight_files.py) and ONNX exports
(onnx_export.py)."""
