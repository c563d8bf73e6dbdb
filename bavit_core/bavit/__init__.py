"""BAViT: the per-token FG/BG ViT, its training, inference, prediction files, post-processing and token metrics."""
