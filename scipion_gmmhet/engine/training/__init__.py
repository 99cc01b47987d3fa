"""Training: gradient features, the training loop, acceleration, several processes."""
