"""Scipion-harness tests of scipion-em-gmmhet. They ship inside the package and make their own
data with the engine's simulator (no downloads):

    scipion3 tests scipion_gmmhet.tests                      # every test module
    scipion3 tests scipion_gmmhet.tests.test_convert         # one module
    python -m scipion tests scipion_gmmhet.tests.test_protocol_import_poses.TestImportPoses

``load_tests`` makes the package name itself run all ``test*.py`` modules here.
"""
import os


def load_tests(loader, standard_tests, pattern):
    """unittest's load_tests protocol: discover every test module of this package."""
    here = os.path.dirname(os.path.abspath(__file__))
    top = os.path.dirname(os.path.dirname(here))
    standard_tests.addTests(loader.discover(start_dir=here, pattern=pattern or 'test*.py',
                                            top_level_dir=top))
    return standard_tests
