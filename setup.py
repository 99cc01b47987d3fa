"""scipion-em-gmmhet: GMM-based heterogeneity analysis (e2gmm's method) for Scipion."""
import os
import re

from setuptools import find_packages, setup

here = os.path.abspath(os.path.dirname(__file__))
with open(os.path.join(here, "scipion_gmmhet", "__init__.py")) as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

# the Scipion plugin's own requirements (the engine needs neither)
SCIPION_REQUIRES = ["scipion-pyworkflow>=3.0", "scipion-em>=3.0"]

setup(
    name="scipion-em-gmmhet",
    version=version,
    description="Conformational and compositional heterogeneity with a Gaussian-mixture-model "
                "neural network (e2gmm's method) on a fast PyTorch engine, as a Scipion plugin",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="GPLv3",
    python_requires=">=3.8",
    packages=find_packages(include=["scipion_gmmhet", "scipion_gmmhet.*"]),
    include_package_data=True,
    package_data={"scipion_gmmhet": ["protocols.conf", "*.png"]},
    # A plain `pip install scipion-em-gmmhet` gives the standalone `gmmhet` engine, no Scipion.
    # `scipion3 installp -p scipion-em-gmmhet` installs it into Scipion's environment, where
    # scipion-pyworkflow and scipion-em already are; `pip install "scipion-em-gmmhet[scipion]"`
    # adds them to any other environment (see SCIPION_REQUIRES).
    install_requires=[
        "torch>=2.1",
        "numpy>=1.21",
        "scipy>=1.7",
        "mrcfile<=1.4.3",
        "pandas",
        "matplotlib",
        "scikit-learn",
        "umap-learn",
    ],
    extras_require={"scipion": SCIPION_REQUIRES, "test": ["pytest", "hypothesis"]},
    entry_points={
        # pyworkflow imports each entry point by its *name*, so the name must be the package.
        "pyworkflow.plugin": ["scipion_gmmhet = scipion_gmmhet"],
        "console_scripts": ["gmmhet = scipion_gmmhet.engine.cli:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
    ],
)
