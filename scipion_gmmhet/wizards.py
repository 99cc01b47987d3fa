"""Wizards of scipion-em-gmmhet (values computed for the protocols' forms). pyworkflow
discovers the Wizard subclasses defined or imported here; none exists yet."""
