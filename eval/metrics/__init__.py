"""Image metrics from local weights only: FID, KID, CLIP score and LPIPS (image_metrics.py), the FID Inception network
(inception.py) and the metrics section of a config (config.py)."""
