"""Sparse fine-tuning of YOLOS (YOLOS-F) and small detectors from scratch, with the dense auxiliary loss."""
