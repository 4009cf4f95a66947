"""Evaluation: held-out loss, perplexity, bits per byte, synthetic-task accuracy (``zoo eval``)."""
