"""The plugin as Scipion sees it: registration through the ``pyworkflow.plugin`` entry point,
variables, bibtex, protocol discovery, the GUI tree (protocols.conf) and how protocols run
the engine (``Plugin.runGmmhet``).

    python -m scipion tests scipion_gmmhet.tests.test_plugin
"""
import os
import subprocess
import sys

import pwem
import pyworkflow as pw
from pyworkflow.tests import BaseTest

import scipion_gmmhet
from scipion_gmmhet.constants import GMMHET_ENV_ACTIVATION, GMMHET_PYTHON


class FakeProtocol:
    """Records runJob calls the way Protocol.runJob receives them."""

    def __init__(self, gpus=None, threads=3):
        self.calls = []
        self._gpus = gpus
        self.numberOfThreads = pw.object.Integer(threads)

    def usesGpu(self):
        return self._gpus is not None

    def getGpuList(self):
        return self._gpus

    def runJob(self, program, arguments, **kwargs):
        self.calls.append((program, arguments, kwargs))


class TestPlugin(BaseTest):
    def test_registeredWithScipion(self):
        plugins = pwem.Domain.getPlugins()
        self.assertIn('scipion_gmmhet', plugins,
                      'scipion_gmmhet is not a Scipion plugin: the pyworkflow.plugin entry point '
                      'must be "scipion_gmmhet = scipion_gmmhet" (pip install -e .)')
        module = plugins['scipion_gmmhet']
        self.assertEqual(module._pluginInstance.getPath(), os.path.dirname(scipion_gmmhet.__file__))
        self.assertEqual(set(module._bibtex.keys()), {'Chen2021', 'Zhong2021'})
        self.assertIn('10.1038/s41592-021-01220-5', module._bibtex['Chen2021']['doi'])
        self.assertIn('10.1038/s41592-020-01049-4', module._bibtex['Zhong2021']['doi'])
        self.assertRegex(scipion_gmmhet.__version__, r'^\d+\.\d+\.\d+$')

    def test_variablesAndDefaults(self):
        Plugin = scipion_gmmhet.Plugin
        if GMMHET_PYTHON not in os.environ:
            self.assertEqual(Plugin.getPython(), sys.executable)
            self.assertTrue(Plugin.usesScipionPython())
        if not os.environ.get(GMMHET_ENV_ACTIVATION):
            self.assertEqual(Plugin.getActivationCmd(), '')
        self.assertEqual(Plugin.validateInstallation(), [])
        self.assertIsNone(Plugin.defineBinaries(None))

    def test_protocolsDiscovered(self):
        protocols = pwem.Domain.getProtocols()
        self.assertIn('ProtGmmhetImportPoses', protocols)
        self.assertEqual(protocols['ProtGmmhetImportPoses'].getClassPackageName(), 'scipion_gmmhet')

    def test_guiTree(self):
        """protocols.conf puts the protocols under 3D > Analysis > Heterogeneity (SPA view) and
        in the Flexibility Hub view; classes not written yet are skipped silently."""
        from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig
        conf = os.path.join(os.path.dirname(pwem.__file__), 'protocols.conf')
        views = ProtocolTreeConfig.load(pw.Config.getDomain(), conf)
        found = {}

        def walk(node, path):
            for child in node.childs:
                if child.value and str(child.value).startswith('ProtGmmhet'):
                    found.setdefault(str(child.value), []).append(' > '.join(path))
                walk(child, path + [str(child.text)])

        for name, view in views.items():
            walk(view, [name])
        paths = found.get('ProtGmmhetImportPoses', [])
        self.assertIn('Protocols SPA > 3D > Analysis > Heterogeneity', paths)
        self.assertIn('Protocols SPA > Imports', paths)  # with the other imports too
        self.assertTrue(any(p.startswith('Flexibility Hub') for p in paths), paths)
        existing = pwem.Domain.getProtocols()
        for cls in found:
            self.assertIn(cls, existing)  # unknown classes never reach the tree

    def test_runGmmhetCommand(self):
        Plugin = scipion_gmmhet.Plugin
        prot = FakeProtocol(gpus=[1, 3])
        Plugin.runGmmhet(prot, 'train', '--particles p.star --out out')
        program, args, kwargs = prot.calls[-1]
        self.assertEqual(program, '%s -m scipion_gmmhet.engine' % Plugin.getPython())
        self.assertEqual(args, 'train --particles p.star --out out')
        env = kwargs['env']
        self.assertEqual(env['CUDA_VISIBLE_DEVICES'], '1,3')
        self.assertEqual(env['OMP_NUM_THREADS'], '3')
        self.assertEqual(kwargs['numberOfMpi'], 1)
        self.assertEqual(kwargs['numberOfThreads'], 3)

        Plugin.runGmmhet(FakeProtocol(), 'build', '--map m.mrc', gpuList=[], numberOfThreads=2)
        prot = FakeProtocol()
        Plugin.runGmmhet(prot, 'build', '--map m.mrc', gpuList=[], numberOfThreads=2, nprocs=2,
                         cwd='/tmp')
        program, _, kwargs = prot.calls[-1]
        self.assertEqual(kwargs['env']['CUDA_VISIBLE_DEVICES'], '')
        self.assertEqual(kwargs['cwd'], '/tmp')
        self.assertIn('-m torch.distributed.run --standalone --nproc_per_node=2 -m '
                      'scipion_gmmhet.engine', program)
        prot = FakeProtocol()  # no GPU list, no explicit one: CUDA_VISIBLE_DEVICES left alone
        Plugin.runGmmhet(prot, 'eval', '--help', env=Plugin.getEnviron())
        self.assertEqual(prot.calls[-1][2]['env'].get('CUDA_VISIBLE_DEVICES'),
                         os.environ.get('CUDA_VISIBLE_DEVICES'))

    def test_engineRunsWithPluginEnviron(self):
        """The exact command protocols run starts the engine (its --version)."""
        Plugin = scipion_gmmhet.Plugin
        out = subprocess.run('%s --version' % Plugin.getProgram(), shell=True, env=Plugin.getEnviron(),
                             capture_output=True, text=True, timeout=120, cwd='/')
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(scipion_gmmhet.__version__, out.stdout + out.stderr)

    def test_engineDoesNotImportScipion(self):
        """Importing the engine must not import pyworkflow/pwem (it runs standalone)."""
        code = ('import sys, scipion_gmmhet.engine.cli; '
                'bad = [m for m in ("pwem", "pyworkflow") if m in sys.modules]; '
                'sys.exit(1 if bad else 0)')
        out = subprocess.run([sys.executable, '-c', code], env=scipion_gmmhet.Plugin.getEnviron(),
                             capture_output=True, text=True, timeout=120, cwd='/')
        self.assertEqual(out.returncode, 0, out.stderr)
