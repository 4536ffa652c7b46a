"""The bundled inference pipeline (pipeline.py): any model form sdkd reads, DPM-Solver++ or one step, the tiny decoder,
LoRA, fp16/bf16; what sample.py, the demo and evaluate.py generate with."""
