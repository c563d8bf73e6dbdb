"""bavit_core: the library behind the ``bavit`` command line.

Every capability is a plain function that returns data or writes files, prints nothing,
and reports progress through an optional callback. Bad input raises a BavitError.
"""
__version__ = "0.1.0"

from .errors import BavitError, InputFileError, OptionError  # noqa: E402
from .labels import Labels, LabelOptions, label_dataset, read_labels  # noqa: E402


def read_predictions(path):
    """Read a predictions parquet (see bavit_core.predict.read_predictions)."""
    from .predict import read_predictions as _read

    return _read(path)


__all__ = [
    "__version__",
    "BavitError",
    "InputFileError",
    "OptionError",
    "Labels",
    "LabelOptions",
    "label_dataset",
    "read_labels",
    "read_predictions",
]
