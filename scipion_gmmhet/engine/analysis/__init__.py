"""Analysis: latent embeddings and clustering, reconstruction, orientation refinement."""
