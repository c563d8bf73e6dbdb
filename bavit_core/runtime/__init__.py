"""Runtime underneath every stage: errors, atomic file I/O, devices, torchrun helpers."""
