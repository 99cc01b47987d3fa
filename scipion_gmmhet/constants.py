"""Constants of the Scipion side of scipion-em-gmmhet: plugin variables, star-file labels the
plugin adds to RELION's, and the choices of the protocols' forms.

Nothing here is a geometric convention: those live in ``scipion_gmmhet.engine.conventions``
(RELION) and in ``scipion_gmmhet.convert`` (where Scipion's meet RELION's).
"""

# ---------------------------------------------------------------- plugin variables
#: Python interpreter that runs the engine (``python -m scipion_gmmhet.engine``). Default: the
#: interpreter running Scipion, where ``pip install scipion-em-gmmhet`` already put the engine.
GMMHET_PYTHON = 'GMMHET_PYTHON'
#: Shell command run before the engine, e.g. ``conda activate gmmhet`` (empty: none).
GMMHET_ENV_ACTIVATION = 'GMMHET_ENV_ACTIVATION'
#: GPU ids offered by default in the protocols' forms (Scipion's "0 1" syntax).
GMMHET_DEFAULT_GPU = 'GMMHET_DEFAULT_GPU'

#: Module run by :meth:`scipion_gmmhet.Plugin.runGmmhet`.
ENGINE_MODULE = 'scipion_gmmhet.engine'

# ---------------------------------------------------------------- star-file labels
#: Scipion particle id, written on every row of a canonical star so that every engine result
#: maps back to its particle by id (never by position).
GMMHET_PARTICLE_ID = 'rlnGmmhetParticleId'
#: Optics-table flags for images that were phase-flipped / amplitude-corrected (Wiener
#: filtered) upstream: 1 or 0. RELION has no label for them (``rlnCtfDataAreCtfPremultiplied``
#: means "multiplied by the CTF", which is neither).
GMMHET_PHASE_FLIPPED = 'rlnGmmhetPhaseFlipped'
GMMHET_AMPLITUDE_CORRECTED = 'rlnGmmhetAmplitudeCorrected'

# ---------------------------------------------------------------- import poses form
POSES_FROM_SET = 0
POSES_FROM_STAR = 1
POSES_FROM_CS = 2
POSES_FROM_CRYODRGN = 3
POSES_FROM_CHOICES = ['Scipion particles', 'RELION star', 'cryoSPARC .cs', 'cryoDRGN poses .pkl']

MATCH_BY_NAME = 0
MATCH_BY_ID = 1
MATCH_BY_ORDER = 2
MATCH_CHOICES = ['image name (stack + index)', 'particle id', 'order']


# Attributes that link Scipion outputs to engine files, and the Flexibility Hub program name.
GMM_FILE_ATTR = '_gmmhet_gmmFile'      #: on a Volume: path of the gmm.npz it renders
TRAIN_DIR_ATTR = '_gmmhet_trainDir'    #: on a particle set: the `gmmhet train` output folder
FLEX_PROG_NAME = 'GMMHET'              #: FlexInfo.getProgName() of this plugin's outputs
