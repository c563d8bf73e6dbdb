"""The detector side: YOLOS loading and configs, the pruned forward, token selection, FLOP/token accounting, COCO evaluation."""
