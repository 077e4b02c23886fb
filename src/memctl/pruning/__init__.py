"""Pruning baselines: magnitude, Wanda, SparseGPT."""
