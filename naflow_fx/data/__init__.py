"""Datasets with ground truth, generated on the fly (nothing is downloaded)."""
