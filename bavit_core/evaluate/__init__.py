"""prune-eval: the sweep of token selectors and operating points over a dataset, its results files, and timing."""
