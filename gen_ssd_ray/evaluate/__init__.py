"""The evaluation job (`python -m jobs.evaluate`): accuracy of a model folder on held-out problems."""
