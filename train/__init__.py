"""sdkd's trainers and their parts. Importing the package silences known-harmless third-party notices
first (train/engine/console.py): diffusers prints some of them while it is being imported."""

from sdkd.train.engine.console import quiet_third_party

quiet_third_party()
