"""The stages of `python -m leworld.train` (leworld/train.py): preflight.py (settings, a resume's
checks, the dataset, the model and its record), loop.py (the training loop), after.py (probe, plan,
the outcome table)."""
