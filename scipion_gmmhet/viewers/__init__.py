"""Viewers of scipion-em-gmmhet, one module per protocol's viewer (pyworkflow discovers the
classes imported here). Each viewer module adds its import line here."""
from .viewer_build_gmm import GmmhetBuildGmmViewer
from .viewer_train import GmmhetTrainViewer
from .viewer_cluster import GmmhetClusterViewer
from .latent_selection import GmmhetLatentSelectionViewer
from .viewer_refine import GmmhetRefineViewer
