"""Training: settings and band (``config``), gradient features, the loop (``train``), mixed
precision and compile (``acceleration``), prefetching, several processes (``distributed``), and
loading a trained model (``trained``)."""
