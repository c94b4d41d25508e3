"""Commands beside the stages: verify, show, export, fit, init."""
