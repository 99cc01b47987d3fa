"""Simulated datasets with known heterogeneity."""
