"""The vision track of the loss-curvature paper: label-noise memorization in a ViT (docs/vision.md)."""
