"""The kubetune trainer: what torchrun starts in every trainer pod, and `kubetune run` locally (no kopf needed)."""
