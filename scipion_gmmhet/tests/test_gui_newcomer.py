"""Harness test of a newcomer's path in the real Scipion GUI, under a private Xvfb server,
following the README:

1. ``make demo`` (here: ``python -m scipion_gmmhet.demo`` at a small size) and the command it
   prints to open the project, run as printed with a PATH that does *not* hold this Python's
   folder: the project window must appear (the screen is no longer blank) and Scipion must not
   fail to relaunch itself ("No module named scipion").
2. "Analyze results" on each gmmhet protocol of the demo project, done as the project window
   does it (the first viewer ``findViewers`` gives, its form window shown): the viewer must be
   the expected one (the train run's has the plots *and* the interactive tab), and every entry
   of its form must give a non-blank plot, or, for ChimeraX without ChimeraX, a message naming
   an existing command file by its absolute path.
3. The live 3D explorer of the train viewer driven by synthetic Tk pointer-motion events over
   the latent plot: every event updates the 3D view, the Gaussians move, updates/s printed.

Screenshots go to the test project's ``screenshots/`` folder (and to ``docs/screenshots`` with
``GMMHET_UPDATE_SCREENSHOTS=1``). ``GMMHET_GUI_TEST_DEMO=<folder>`` reuses a demo already built
there by a previous run (project ``gmmhet_demo_gui``).

    python -m scipion tests scipion_gmmhet.tests.test_gui_newcomer
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unittest

import numpy as np

from pyworkflow.tests import BaseTest, setupTestProject

from scipion_gmmhet.tests.test_gui_forms import (XVFB_MISSING, Xvfb, closeTk, docsScreenshotDir,
                                                 grabWindow, newMainWindow, pngStats)

PROJECT = 'gmmhet_demo_gui'
DEMO_ARGS = ['--n', '300', '--box', '48', '--epochs', '4', '--clusters', '2']
EXPECTED_VIEWERS = {'ProtGmmhetBuildGmm': 'GmmhetBuildGmmViewer',
                    'ProtGmmhetTrain': 'GmmhetTrainViewer',
                    'ProtGmmhetCluster': 'GmmhetClusterViewer',
                    'ProtGmmhetRefine': 'GmmhetRefineViewer'}


def sessionPids(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid`` (what a command started with
    ``start_new_session`` left running, detached children included)."""
    pids = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    with open('/proc/%s/stat' % name) as f:
                        if f.read().split(') ')[-1][:1] != 'Z':
                            pids.append(int(name))
            except (OSError, ProcessLookupError):
                pass
    return pids


def screenStats(display: str) -> dict:
    from PIL import ImageGrab
    img = np.asarray(ImageGrab.grab(xdisplay=display).convert('RGB'))
    flat = img.reshape(-1, 3)
    _, counts = np.unique(flat, axis=0, return_counts=True)
    return {'colours': len(counts), 'dominant': float(counts.max() / counts.sum())}


@unittest.skipIf(shutil.which('Xvfb') is None, XVFB_MISSING)
class TestNewcomerGui(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.outDir = os.path.abspath(cls.proj.getPath('screenshots'))
        os.makedirs(cls.outDir, exist_ok=True)
        cls.xvfb = Xvfb.shared()
        cls.oldDisplay = os.environ.get('DISPLAY')
        os.environ['DISPLAY'] = cls.xvfb.display
        cls.demoDir = os.environ.get('GMMHET_GUI_TEST_DEMO') or os.path.abspath(cls.proj.getPath('demo'))
        cls.printed = cls._demo()

    mainWindow = None
    demo = None

    @classmethod
    def tearDownClass(cls):
        if cls.mainWindow is not None:   # its windows, pending callbacks, pyworkflow's image cache
            closeTk(cls.mainWindow.root)
            cls.mainWindow = None
        if cls.oldDisplay is None:
            os.environ.pop('DISPLAY', None)
        else:
            os.environ['DISPLAY'] = cls.oldDisplay

    @classmethod
    def _demo(cls) -> str:
        """Runs the demo (unless reused) and returns the command it printed to open the GUI."""
        log = os.path.join(cls.demoDir, 'demo_stdout.txt')
        from pyworkflow.project import Manager
        if not (os.path.exists(log) and Manager().hasProject(PROJECT)):
            os.makedirs(cls.demoDir, exist_ok=True)
            out = subprocess.run([sys.executable, '-m', 'scipion_gmmhet.demo', '--out', cls.demoDir,
                                  '--project', PROJECT] + DEMO_ARGS,
                                 capture_output=True, text=True, timeout=1800)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            with open(log, 'w') as f:
                f.write(out.stdout)
        with open(log) as f:
            text = f.read()
        m = re.search(r'Open it in the Scipion GUI:.*\n\s+(\S.*-m scipion project \S+)', text)
        assert m, 'the demo does not print a command to open the project:\n' + text[-1500:]
        return m.group(1).strip()

    def _shot(self, tkWindow, name):
        out = grabWindow(tkWindow, self.xvfb.display, os.path.join(self.outDir, name + '.png'))
        if docsScreenshotDir():
            os.makedirs(docsScreenshotDir(), exist_ok=True)
            shutil.copyfile(out, os.path.join(docsScreenshotDir(), name + '.png'))
        stats = pngStats(out)
        self.assertGreater(stats['colours'], 8, (name, stats))
        self.assertLess(stats['dominant'], 0.98, (name, stats))
        return out

    # ------------------------------------------------------------------ 0. the demo report
    def test_0_demo_report_has_what_a_scientist_checks_first(self):
        with open(os.path.join(self.demoDir, 'report.md')) as f:
            report = f.read()
        for png in ('latent_pca_classes.png', 'class_fsc.png', 'class_maps.png', 'pose_changes.png',
                    'training_loss.png'):
            self.assertIn('(%s)' % png, report)
            self.assertGreater(pngStats(os.path.join(self.demoDir, png))['colours'], 20, png)
        self.assertNotIn('spearman_pc1', report)          # readable metric names
        self.assertNotRegex(report, r'\d\.\d{6,}')         # no long float lists
        self.assertRegex(report, r'\n\| 1 \| \d+ \|')      # classes numbered from 1, as in the GUI
        self.assertNotRegex(report, r'\n\| 0 \| \d+ \|')

    # ------------------------------------------------------------------ 1. the printed command
    def test_1_printed_command_opens_the_project(self):
        self.assertIn('PATH=', self.printed)
        env = dict(os.environ)
        venvBin = os.path.dirname(sys.executable)
        env['PATH'] = os.pathsep.join(p for p in env.get('PATH', '').split(os.pathsep)
                                      if os.path.abspath(p) != os.path.abspath(venvBin)) or '/usr/bin:/bin'
        before = screenStats(self.xvfb.display)
        errFile = os.path.join(self.outDir, 'gui_command_stderr.txt')
        with open(errFile, 'w') as err:
            proc = subprocess.Popen(['bash', '-c', self.printed], env=env, stdout=err, stderr=err,
                                    start_new_session=True)
        try:
            # the printed command (python -O) opens the window in its own process; follow the
            # screen and the processes of this session either way (without -O Scipion's
            # launcher relaunches the GUI as a detached child and returns)
            deadline, stats = time.time() + 150, before
            while time.time() < deadline:
                time.sleep(2)
                stats = screenStats(self.xvfb.display)
                if stats['colours'] > 50 and stats['dominant'] < 0.9:
                    break
            with open(errFile) as f:
                log = f.read()
            self.assertNotIn('No module named', log)
            self.assertTrue(sessionPids(proc.pid), 'no GUI process left: %s' % log[-2000:])
            self.assertGreater(stats['colours'], 50, (before, stats, log[-2000:]))
            from PIL import ImageGrab
            img = ImageGrab.grab(xdisplay=self.xvfb.display)
            img.save(os.path.join(self.outDir, 'project_window.png'))
            if docsScreenshotDir():
                img.save(os.path.join(docsScreenshotDir(), 'project_window.png'))
            print('printed command opened the project window (%d colours on screen)' % stats['colours'])
        finally:
            for pid in sessionPids(proc.pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    # ------------------------------------------------------------------ 2-3. Analyze results
    def _analyze(self, mainWindow, prot, check):
        """What the project window's "Analyze results" does, with ``check(viewer)`` run once the
        viewer's form is on screen (inside its Tk main loop, which it then leaves)."""
        from pyworkflow.viewer import DESKTOP_TKINTER
        viewers = self.demo.getDomain().findViewers(prot, DESKTOP_TKINTER)
        self.assertTrue(viewers, prot.getRunName())
        viewer = viewers[0](project=self.demo, protocol=prot, parent=mainWindow)
        self.assertEqual(type(viewer).__name__, EXPECTED_VIEWERS[prot.getClassName()])
        outcome = {}

        def run():
            form = getattr(viewer, 'formWindow', None)
            if form is None or form is mainWindow:   # visualize() failed: no form (see below)
                return
            try:
                outcome['result'] = check(viewer)
            except BaseException as exc:  # re-raised below, outside Tk
                outcome['error'] = exc
            finally:
                form.root.quit()

        afterId = mainWindow.root.after(300, run)
        try:
            viewer.visualize(prot, windows=mainWindow)
        finally:
            # never left pending: it would fire in a later test's event loop
            mainWindow.root.after_cancel(afterId)
            form = getattr(viewer, 'formWindow', None)
            if form is not None and form is not mainWindow:
                form.root.destroy()
        if 'error' in outcome:
            raise outcome['error']
        return outcome['result']

    def _checkViews(self, viewer, name):
        """Every entry of the viewer's form: plots not blank, messages name existing files."""
        from pwem.viewers.plotter import EmPlotter
        from pyworkflow.viewer import MessageView
        self.assertTrue(viewer.getClassLabel().startswith('gmmhet - viewer'), viewer.getClassLabel())
        viewer.formWindow.root.geometry('760x560+0+0')   # on screen whole, for the screenshot
        self._shot(viewer.formWindow.root, 'analyze_%s' % name)
        seen = {}
        for key, show in viewer._getVisualizeDict().items():
            if key == 'displaySelection':
                continue  # test_3 drives it
            views = show(key)
            self.assertTrue(views, key)
            doMotion = getattr(viewer.protocol, 'doMotionCorrected', None)
            if key == 'displayMotionCorrected' and not (doMotion is not None and doMotion.get()):
                # an option the demo leaves off: the entry says how to turn it on
                self.assertEqual(len(views), 1, key)
                self.assertIn('Motion-corrected consensus map? = Yes', views[0]._msg)
                seen[key] = 'hint'
                continue
            kinds = []
            for i, v in enumerate(views):
                if isinstance(v, EmPlotter):
                    png = os.path.join(self.outDir, 'analyze_%s_%s_%d.png' % (name, key, i))
                    v.getFigure().savefig(png)
                    stats = pngStats(png)
                    self.assertGreater(stats['colours'], 20, (key, stats))
                    self.assertTrue(any(ax.has_data() for ax in v.getFigure().axes), key)
                    kinds.append('plot')
                elif isinstance(v, MessageView):
                    self.assertNotIn('Error', v._title or '', (key, v._msg))
                    paths = re.findall(r'(/\S+\.cxc)', v._msg)
                    self.assertTrue(paths and all(os.path.isabs(p) and os.path.exists(p) for p in paths),
                                    (key, v._msg))
                    kinds.append('message')
                else:
                    kinds.append(type(v).__name__)
            seen[key] = '+'.join(kinds)
        print('Analyze results of %s: %s' % (name, seen))
        return seen

    def _demoProject(self):
        from pyworkflow.project import Manager
        if type(self).demo is None:
            type(self).demo = Manager().loadProject(PROJECT)
        return self.demo

    def _mainWindow(self):
        cls = type(self)
        if cls.mainWindow is None:   # a fresh Tk interpreter (earlier GUI tests closed theirs)
            cls.mainWindow = newMainWindow('gmmhet demo project (test)')
        return cls.mainWindow

    def _prot(self, className):
        for prot in self._demoProject().getRuns():
            if prot.getClassName() == className and prot.isFinished():
                return prot
        self.fail('no finished %s in %s' % (className, PROJECT))

    def test_2_analyze_results_of_each_protocol(self):
        self._demoProject()
        mainWindow = self._mainWindow()
        expect = {'ProtGmmhetBuildGmm': ('build', {'displayFsc': 'plot', 'displayChimera': 'message'}),
                  'ProtGmmhetTrain': ('train', {'displayLatent': 'plot', 'displayLoss': 'plot'}),
                  'ProtGmmhetCluster': ('cluster', {'displayEmbedding': 'plot', 'displaySizes': 'plot',
                                                    'displayFsc': 'plot', 'displayMaps': 'message',
                                                    'displayTrajectory': 'message',
                                                    'displayDisplacements': 'plot+message'}),
                  'ProtGmmhetRefine': ('refine', {'displayChanges': 'plot', 'displayFsc': 'plot',
                                                  'displayMaps': 'message'})}
        from scipion_gmmhet.viewers.chimerax import chimerax_program
        for className, (name, want) in expect.items():
            # the run graph titles runs "gmmhet - ...", not "scipion_gmmhet - ..."; the plugin
            # itself keeps its package name (queue templates, plugin lookups)
            self.assertEqual(self._prot(className).getPlugin().getName(), 'scipion_gmmhet')
            self.assertTrue(self._prot(className).getRunName().startswith('gmmhet - '),
                            self._prot(className).getRunName())
            seen = self._analyze(mainWindow, self._prot(className),
                                 lambda viewer, name=name: self._checkViews(viewer, name))
            for key, kind in want.items():
                if 'message' in kind and chimerax_program():
                    continue  # ChimeraX installed: it opens instead of the message
                self.assertEqual(seen.get(key), kind, (name, key, seen))

    def test_3_live_explorer_follows_the_pointer(self):
        self._demoProject()
        mainWindow = self._mainWindow()
        prot = self._prot('ProtGmmhetTrain')

        def drive(viewer):
            self.assertIn('displaySelection', viewer._getVisualizeDict())
            viewer.openChimerax.set(False)
            views = viewer._showSelection()
            views[0].show()
            win = views[0].window
            win.root.geometry('1270x600+0+0')
            panel = win.explorer3d
            self.assertIsNotNone(panel)
            widget = win.canvas.get_tk_widget()
            for _ in range(10):
                win.root.update()
            bbox = win.ax.get_window_extent()
            h = widget.winfo_height()
            n = 40
            xs = np.linspace(bbox.x0 + 5, bbox.x1 - 5, n)
            ys = h - np.linspace(bbox.y0 + 5, bbox.y1 - 5, n)
            panel.updates, panel.seconds = 0, 0.0
            first = None
            t0 = time.perf_counter()
            for x, y in zip(xs, ys):
                widget.event_generate('<Motion>', x=int(x), y=int(y))
                win.root.update()
                if first is None and panel.updates:
                    first = np.array(panel.centres, dtype=float).copy()
            wall = time.perf_counter() - t0
            last = np.array(panel.centres, dtype=float)
            self.assertEqual(panel.updates, n)   # one update per pointer event
            self.assertGreater(float(np.abs(last - first).max()), 0.0)   # the Gaussians moved
            rate = panel.updates / wall
            print('live 3D explorer: %d Gaussians, %d pointer events -> %d updates in %.2f s = %.1f '
                  'updates/s' % (len(panel.explorer.neutral), n, panel.updates, wall, rate))
            path = panel.saveMap()
            self.assertTrue(path and os.path.exists(path), win.status.get())
            self.assertTrue(os.path.exists(os.path.splitext(path)[0] + '.cxc'))
            if not panel.chimerax:
                panel.openInChimerax()
                self.assertIn('chimerax %s' % os.path.splitext(path)[0], win.status.get())
            self._shot(win.root, 'latent_explorer_3d')
            win.root.destroy()
            return rate

        rate = self._analyze(mainWindow, prot, drive)
        self.assertGreater(rate, 0)
