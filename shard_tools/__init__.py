"""Packing image folders into validated, deduplicated WebDataset shards."""
