"""Labels: annotations → patch-level FG/BG label grids, and the labels parquet file."""
from .labelfile import FORMAT, META_KEY, Labels, fixed_list_to_numpy, read_labels, read_parquet_table, write_labels
from .labeling import LabelOptions, LabelSummary, label_dataset

__all__ = ["FORMAT", "META_KEY", "Labels", "LabelOptions", "LabelSummary", "fixed_list_to_numpy", "label_dataset",
           "read_labels", "read_parquet_table", "write_labels"]
