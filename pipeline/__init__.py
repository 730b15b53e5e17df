"""Loaders, augmentation, training, evaluation, prediction, export and benchmarks."""
