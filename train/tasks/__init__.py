"""What each trainer does in one step, handed to the loop: the diffusion task of the U-Net trainers (diffusion.py) and
its objective (objective.py), the LoRA on U-Net and text encoder (lora.py), the tiny decoder (decoder.py), the VAE
(autoencoder.py) and the one-step student (one_step.py, with its ODE pairs, ode_pairs.py, and sampled latents,
sampled_latents.py); each trainer's config schema, light enough for --help (diffusion_config.py: kd, finetune, lora;
autoencoder_config.py, decoder_config.py, one_step_config.py). Beside them, not a trainer's: the block ranking of
`show_student.py --rank` (ranking.py), which runs the teacher as the KD objective does (conditioning, timesteps,
predictions) and so sits above train/losses."""
