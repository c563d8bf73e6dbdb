"""A batch of detector inputs and kept tokens, for images of one size or of many."""
from __future__ import annotations

# moved to the lower room (detection/), where ``bavit detect``'s predictor uses them too
from ..detection.batches import autocast_args, batch_inputs, take  # noqa: F401
