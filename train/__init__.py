"""sdkd's trainers and their parts. Importing the package silences known-harmless third-party notices
first (train/console.py): diffusers prints some of them while it is being imported."""

from sdkd.train.console import quiet_third_party

quiet_third_party()
