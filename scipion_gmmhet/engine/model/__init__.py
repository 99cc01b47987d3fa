"""The model: the Gaussian mixture, its Fourier projection, FRC/FSC, the networks, symmetry, building a GMM from a map."""
