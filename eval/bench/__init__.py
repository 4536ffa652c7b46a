"""What the benchmark commands share: the KD-step benchmark's models, data and step (setup.py) and timing helpers run
side by side (timing.py)."""
