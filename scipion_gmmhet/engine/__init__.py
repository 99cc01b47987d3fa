"""The gmmhet engine: e2gmm's Gaussian-mixture heterogeneity method on PyTorch.

Scientific-Python dependencies only (torch, numpy, scipy, mrcfile, pandas, scikit-learn,
umap-learn); it never imports pyworkflow or pwem and runs on its own through ``gmmhet``.
The packages follow the data flow:

- ``conventions`` (RELION geometry and CTF, defined once), ``errors``, and ``device``
  (``--device``, pinned memory, the out-of-memory policy);
- ``io/``: STAR, MRC, particle metadata, particle data (images, poses, CTF, batches), atomic
  writes, input validation;
- ``model/``: the Gaussian mixture and its Fourier projection, FRC/FSC, the networks,
  symmetry, building a GMM from a map;
- ``training/``: settings and band (``config``), gradient features, the loop (``train``),
  mixed precision and compile (``acceleration``), several processes, loading a trained
  model (``trained``);
- ``analysis/``: latent embeddings and clustering, reconstruction, orientation refinement;
- ``simulation/``: datasets with known heterogeneity;
- ``commands/``: one ``gmmhet`` sub-command per module, dispatched by ``cli``.
"""
