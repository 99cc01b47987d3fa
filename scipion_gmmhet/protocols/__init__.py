"""Protocols of scipion-em-gmmhet, one module per protocol (pyworkflow discovers the classes
imported here)."""
from .protocol_import_poses import ProtGmmhetImportPoses
from .protocol_build_gmm import ProtGmmhetBuildGmm
from .protocol_train import ProtGmmhetTrain
from .protocol_cluster import ProtGmmhetCluster
from .protocol_refine import ProtGmmhetRefine
