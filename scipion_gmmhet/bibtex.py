# -*- coding: utf-8 -*-
"""
@article{Chen2021,
title = "Deep learning-based mixed-dimensional Gaussian mixture model for characterizing variability in cryo-EM",
journal = "Nature Methods",
volume = "18",
number = "8",
pages = "930--936",
year = "2021",
doi = "https://doi.org/10.1038/s41592-021-01220-5",
url = "https://www.nature.com/articles/s41592-021-01220-5",
author = "Chen, Muyuan and Ludtke, Steven J.",
}

@article{Zhong2021,
title = "{CryoDRGN}: reconstruction of heterogeneous cryo-EM structures using neural networks",
journal = "Nature Methods",
volume = "18",
number = "2",
pages = "176--185",
year = "2021",
doi = "https://doi.org/10.1038/s41592-020-01049-4",
url = "https://www.nature.com/articles/s41592-020-01049-4",
author = "Zhong, Ellen D. and Bepler, Tristan and Berger, Bonnie and Davis, Joseph H.",
}
"""
