"""The gmmhet engine: e2gmm's Gaussian-mixture heterogeneity method on PyTorch.

Scientific-Python dependencies only (torch, numpy, scipy, mrcfile, pandas, scikit-learn,
umap-learn); it never imports pyworkflow or pwem and runs on its own through ``gmmhet``.
Modules: ``conventions`` (RELION geometry and CTF, defined once), ``star``/``mrc``/
``metadata``/``data`` (input), ``gmm``/``fourier`` (model, projection, FRC/FSC), ``build``,
``model``/``train`` (heterogeneity network), ``analysis``, ``reconstruct``, ``refine``,
``simulate``, and ``commands/`` (one CLI command per module).
"""
