"""Export: ONNX graphs of BAViT, the pruned YOLOS and the whole pipeline, and running them in ONNX Runtime."""
