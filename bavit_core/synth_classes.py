"""Class names of the generated datasets (bavit synth)."""

CLASS_NAMES = ("triangle", "rectangle", "ellipse", "star", "hexagon")
