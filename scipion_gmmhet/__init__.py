"""scipion-em-gmmhet: cryo-EM heterogeneity with a Gaussian-mixture-model neural network
(e2gmm's method, Chen & Ludtke 2021) on a PyTorch engine, as a Scipion plugin.

The engine (``scipion_gmmhet.engine``) never imports pyworkflow or pwem; protocols run it as
``<GMMHET_PYTHON> -m scipion_gmmhet.engine <command> ...`` through :meth:`Plugin.runGmmhet`, so
Scipion's logs, GPU lists and queues apply to it. Scipion objects are turned into the engine's
canonical RELION 3.1 star (and back) only in :mod:`scipion_gmmhet.convert`.
"""
from __future__ import annotations

__version__ = "0.2.0"
_references = ['Chen2021', 'Zhong2021']


def __getattr__(name):
    """Define :class:`Plugin` on first use (PEP 562), so that ``import scipion_gmmhet.engine``
    (the standalone ``gmmhet`` command) never imports pyworkflow or pwem."""
    if name == 'Plugin':
        try:
            plugin = _definePlugin()
        except ImportError as exc:
            if getattr(exc, 'name', None) not in ('pwem', 'pyworkflow'):
                raise
            raise ImportError("scipion_gmmhet.Plugin needs Scipion (scipion-pyworkflow and "
                              "scipion-em): install it with 'scipion3 installp -p scipion-em-gmmhet' "
                              "or pip install 'scipion-em-gmmhet[scipion]'. The standalone engine "
                              "(the gmmhet command) needs neither.", name=exc.name) from exc
        globals()['Plugin'] = plugin
        return plugin
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def _definePlugin():
    import os
    import sys

    import pwem
    import pyworkflow.utils as pwutils
    from pyworkflow.config import VarTypes

    from .constants import (ENGINE_MODULE, GMMHET_DEFAULT_GPU, GMMHET_ENV_ACTIVATION,
                            GMMHET_PYTHON)

    class Plugin(pwem.Plugin):
        """Scipion plugin class: configuration variables and how to run the engine.

        Variables (set them in ``scipion.conf`` [PLUGINS] or in the environment):
        ``GMMHET_PYTHON`` (default: the Python running Scipion, where a ``pip install`` put the
        engine), ``GMMHET_ENV_ACTIVATION`` (e.g. ``conda activate gmmhet``; default empty) and
        ``GMMHET_DEFAULT_GPU`` (default ``0``). Nothing is downloaded or built.
        """
        _url = "https://github.com/scipion-em/scipion-em-gmmhet"
        _processingField = ['SPA', 'FLEXIBILITY']

        @classmethod
        def _defineVariables(cls):
            cls._defineVar(GMMHET_PYTHON, sys.executable,
                           description="Python interpreter that runs the gmmhet engine "
                                       "(python -m scipion_gmmhet.engine). Default: Scipion's own.",
                           var_type=VarTypes.PATH)
            cls._defineVar(GMMHET_ENV_ACTIVATION, '',
                           description="Command run before the engine, e.g. 'conda activate gmmhet' "
                                       "(empty: none).")
            cls._defineVar(GMMHET_DEFAULT_GPU, '0',
                           description="GPU ids offered by default in the gmmhet protocols, e.g. '0 1'.")

        # ------------------------------------------------------------------ configuration
        @classmethod
        def getPython(cls) -> str:
            """The interpreter that runs the engine."""
            return cls.getVar(GMMHET_PYTHON) or sys.executable

        @classmethod
        def usesScipionPython(cls) -> bool:
            """True when the engine runs in Scipion's own interpreter (the default)."""
            try:
                return os.path.samefile(cls.getPython(), sys.executable)
            except OSError:
                return cls.getPython() == sys.executable

        @classmethod
        def getActivationCmd(cls) -> str:
            """Shell prefix that activates the engine's environment ('' when none is set), ending
            in ``&&``. A ``conda activate ...`` command gets Scipion's conda hook in front."""
            activation = (cls.getVar(GMMHET_ENV_ACTIVATION) or '').strip()
            if not activation:
                return ''
            if activation.startswith('conda ') and 'conda shell' not in activation:
                activation = ('%s %s' % (cls.getCondaActivationCmd(), activation)).strip()
            return activation.rstrip(' ;&') + ' &&'

        @classmethod
        def getDefaultGpu(cls) -> str:
            return cls.getVar(GMMHET_DEFAULT_GPU) or '0'

        @classmethod
        def getEnviron(cls) -> pwutils.Environ:
            """Environment for the engine: Scipion's own when the engine runs in Scipion's Python
            (the package is installed there). With another interpreter, Scipion's PYTHONPATH is
            dropped (it would shadow that interpreter's packages) and, for a development checkout,
            the checkout is put on PYTHONPATH so ``scipion_gmmhet.engine`` imports from it;
            an installed (non-devel) plugin needs ``pip install scipion-em-gmmhet`` in that
            environment too.
            """
            environ = pwutils.Environ(os.environ)
            if not cls.usesScipionPython():
                environ.pop('PYTHONPATH', None)
                parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                if os.path.basename(parent) not in ('site-packages', 'dist-packages'):
                    environ.set('PYTHONPATH', parent)
            return environ

        @classmethod
        def getProgram(cls, nprocs: int = 1) -> str:
            """The engine's command line without arguments: ``[activation &&] PYTHON -m
            scipion_gmmhet.engine``, or through ``torch.distributed.run`` with ``nprocs`` processes
            on this node when ``nprocs > 1``."""
            python = cls.getPython()
            if ' ' in python:
                python = '"%s"' % python
            if nprocs and nprocs > 1:
                program = '%s -m torch.distributed.run --standalone --nproc_per_node=%d -m %s' % (
                    python, nprocs, ENGINE_MODULE)
            else:
                program = '%s -m %s' % (python, ENGINE_MODULE)
            activation = cls.getActivationCmd()
            return '%s %s' % (activation, program) if activation else program

        # ------------------------------------------------------------------ running
        @classmethod
        def runGmmhet(cls, protocol, command: str, args: str, gpuList: list[int] | None = None,
                      numberOfThreads: int | None = None, nprocs: int = 1, cwd: str | None = None,
                      env: pwutils.Environ | None = None):
            """Run ``gmmhet <command> <args>`` as a job of ``protocol`` (its log, host and queue).

            ``gpuList``: GPU ids for ``CUDA_VISIBLE_DEVICES``; ``None`` takes the protocol's own GPU
            list when it has one and uses it (``protocol.usesGpu()``) and otherwise leaves the
            variable alone; ``[]`` hides every GPU. Whether to pass ``--device cpu`` is the
            caller's decision. ``numberOfThreads`` (default: the protocol's) also sets
            ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``. ``nprocs > 1`` launches that many processes
            with ``torch.distributed.run`` (one per GPU). ``cwd`` defaults to the project folder,
            where Scipion runs protocols, so paths from ``protocol._getExtraPath()`` work.
            """
            environ = env if env is not None else cls.getEnviron()
            if gpuList is None and hasattr(protocol, 'usesGpu') and protocol.usesGpu():
                from .protocols.gpu import protocolGpus
                gpuList = protocolGpus(protocol)
            if gpuList is not None:
                environ['CUDA_VISIBLE_DEVICES'] = ','.join(str(int(g)) for g in gpuList)
            if numberOfThreads is None:
                threads = getattr(protocol, 'numberOfThreads', None)
                numberOfThreads = threads.get() if threads is not None and threads.get() else 1
            numberOfThreads = max(1, int(numberOfThreads))
            environ['OMP_NUM_THREADS'] = str(numberOfThreads)
            environ['MKL_NUM_THREADS'] = str(numberOfThreads)
            kwargs = dict(env=environ, numberOfMpi=1, numberOfThreads=numberOfThreads)
            if cwd is not None:
                kwargs['cwd'] = cwd
            protocol.runJob(cls.getProgram(nprocs), '%s %s' % (command, args), **kwargs)

        @classmethod
        def validateInstallation(cls):
            """Errors when the engine's interpreter is missing (shown by the protocols' forms)."""
            python = cls.getPython()
            if os.path.isabs(python) and not os.access(python, os.X_OK):
                return ["%s = %s: not an executable file; set it to the Python that has "
                        "scipion-em-gmmhet installed (or leave it unset to use Scipion's)."
                        % (GMMHET_PYTHON, python)]
            return []

        @classmethod
        def defineBinaries(cls, env):
            """Nothing to install: the engine is this Python package (its dependencies come with
            ``pip install scipion-em-gmmhet``)."""
            return

    Plugin.__qualname__ = 'Plugin'
    return Plugin
