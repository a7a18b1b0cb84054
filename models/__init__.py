"""Datasets (offline) and model architectures for the training workers."""
