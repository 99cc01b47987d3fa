"""How the gmmhet protocols are named in the Scipion GUI: "gmmhet - <label>" in the protocol
tree, the run graph and new runs' titles (pyworkflow's default prefixes the package name,
"scipion_gmmhet - ...", which the tree's column cuts to "scipion_gmmh..."), and "gmmhet
compute" over the form's threads/GPU settings. Display only: pyworkflow finds the plugin through
the protocol's module, not these names."""

SHORT_NAME = 'gmmhet'


class GmmhetLabel:
    """Mix-in (first base) for the gmmhet protocols."""

    @classmethod
    def getClassLabel(cls, prependPackageName=True):
        label = getattr(cls, '_label', cls.__name__)
        return '%s - %s' % (SHORT_NAME, label) if prependPackageName else label

    @classmethod
    def getClassPackageName(cls):
        return SHORT_NAME
