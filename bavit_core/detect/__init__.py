"""detect: a pruned detector at one operating point on the user's own images.

``point`` (the operating point: which tokens the detector computes — BAViT's, or a trained
gate's inside the detector), ``predictor`` (:class:`PrunedDetector`: images → detections,
kept tokens, timings; also what prune-eval's sweep runs for each of its rows), ``sources``
(finding and decoding images), ``outputs`` (detections.json, summary.csv, overlays, the
resume journal) and ``run`` (``bavit detect``).
"""
