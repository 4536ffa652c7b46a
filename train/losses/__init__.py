"""What is measured and minimised: the diffusion task and KD losses (kd.py), SDXS's feature matching
(feature_matching.py), DMD2-style score distillation (score_distillation.py), the discriminator and GAN losses
(adversarial.py), LPIPS-VGG (perceptual.py) and teacher agreement on held-out triples (agreement.py); the `loss` and
triples config sections (config.py)."""
