"""The sample stage: the embedded sample dataset."""
