"""How the gmmhet protocols are named in the Scipion GUI: "gmmhet - <label>" in the protocol
tree, the run graph and new runs' titles (pyworkflow's default prefixes the package name,
"scipion_gmmhet - ...", which the tree's column cuts to "scipion_gmmh..."). Display only:
the package name (getClassPackageName, the plugin's getName) stays "scipion_gmmhet"."""

SHORT_NAME = 'gmmhet'


class GmmhetLabel:
    """Mix-in (first base) for the gmmhet protocols."""

    @classmethod
    def getClassLabel(cls, prependPackageName=True):
        label = getattr(cls, '_label', cls.__name__)
        return '%s - %s' % (SHORT_NAME, label) if prependPackageName else label
