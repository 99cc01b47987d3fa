"""scipion-em-gmmhet: GMM-based heterogeneity analysis (e2gmm's method) for Scipion."""
import os
import re

from setuptools import find_packages, setup

here = os.path.abspath(os.path.dirname(__file__))
with open(os.path.join(here, "scipion_gmmhet", "__init__.py")) as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

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
    install_requires=[
        "scipion-pyworkflow>=3.0",
        "scipion-em>=3.0",
        "torch>=2.1",
        "numpy>=1.21",
        "scipy>=1.7",
        "mrcfile<=1.4.3",
        "pandas",
        "matplotlib",
        "scikit-learn",
        "umap-learn",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
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
