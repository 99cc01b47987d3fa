"""Harness test: every protocol's form opens in a real Scipion GUI window (pyworkflow's
``FormWindow``, Tk) under a private Xvfb X server, and a PNG screenshot of it is saved to the
test's output folder (and, with ``GMMHET_UPDATE_SCREENSHOTS=1`` when the package runs from a
clone, to ``docs/screenshots/<protocol>.png``: tests leave the source tree alone otherwise);
each PNG must exist and not be blank. The interactive latent-selection window
is opened too, driven without a mouse (a lasso polygon and a point pick), and screenshotted.

Needs the X virtual frame buffer (Debian/Ubuntu: ``apt-get install -y xvfb``; screenshots are
taken with Pillow's ``ImageGrab`` over XCB, no other package). Without ``Xvfb`` on the PATH the
tests are skipped with that message.

    python -m scipion tests scipion_gmmhet.tests.test_gui_forms
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import time
import unittest

import numpy as np

from pyworkflow.tests import BaseTest, setupTestProject

#: (protocol module, class, screenshot name)
PROTOCOLS = [
    ('protocol_import_poses', 'ProtGmmhetImportPoses', 'import_poses'),
    ('protocol_build_gmm', 'ProtGmmhetBuildGmm', 'build_gmm'),
    ('protocol_train', 'ProtGmmhetTrain', 'train'),
    ('protocol_cluster', 'ProtGmmhetCluster', 'cluster'),
    ('protocol_refine', 'ProtGmmhetRefine', 'refine'),
]
SCREEN = (1280, 1024)
FORM_SIZE = (900, 880)
XVFB_MISSING = ('Xvfb is not installed: the GUI screenshot tests need an X virtual frame buffer '
                '(Debian/Ubuntu: apt-get install -y xvfb)')


def docsScreenshotDir() -> str | None:
    """``docs/screenshots`` of the source checkout this package runs from, when
    ``GMMHET_UPDATE_SCREENSHOTS=1`` asks for them (None otherwise, and when the package is
    installed elsewhere, e.g. site-packages, where the README is not)."""
    if os.environ.get('GMMHET_UPDATE_SCREENSHOTS') != '1':
        return None
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.dirname(pkg)
    if os.path.isfile(os.path.join(root, 'setup.py')) and os.path.isdir(os.path.join(root, 'docs')):
        return os.path.join(root, 'docs', 'screenshots')
    return None


class Xvfb:
    """A private Xvfb server: Xvfb chooses a free display number itself (``-displayfd``)."""

    def __init__(self, size=SCREEN):
        self.size = size
        self.proc = None
        self.display = None

    def start(self, timeout=20.0):
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            ['Xvfb', '-displayfd', str(w), '-screen', '0', '%dx%dx24' % self.size,
             '-nolisten', 'tcp', '-noreset'],
            pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(w)
        deadline = time.time() + timeout
        data = b''
        with os.fdopen(r, 'rb') as f:
            while not data.endswith(b'\n') and time.time() < deadline:
                chunk = f.read(1)
                if not chunk:
                    break
                data += chunk
        if not data.strip():
            self.stop()
            raise RuntimeError('Xvfb did not report a display number')
        self.display = ':%d' % int(data.strip())
        return self.display

    _shared = None

    @classmethod
    def shared(cls) -> "Xvfb":
        """One server for the whole test process, stopped when the process exits. Tk keeps
        process-wide X resources (fonts, images, Scipion's icon cache) on the first display it
        opens: stopping that server and opening Tk on another one kills the process with an
        X IO error, so every GUI test of a run uses this one."""
        if cls._shared is None or cls._shared.proc is None or cls._shared.proc.poll() is not None:
            import atexit
            cls._shared = cls()
            cls._shared.start()
            atexit.register(cls._shared.stop)
        return cls._shared

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


# ---------------------------------------------------------------------------- Tk hygiene
# All harness modules run in one process (``python -m scipion tests scipion_gmmhet.tests``):
# a GUI test must leave no Tk state behind that a later one trips over.

def quietBackgroundErrors(widget):
    """A Tk background error (e.g. a stale ``after`` script) printed to stderr instead of Tk's
    modal error dialog, which nobody closes under Xvfb (the whole test run would hang)."""
    widget.tk.eval('proc bgerror {msg} {puts stderr "Tk background error: $msg"}')


def cancelAfterCallbacks(widget):
    """Cancel every pending ``after``/``after_idle`` callback of ``widget``'s Tcl interpreter:
    Tcl timers of every interpreter fire in any later Tk event loop of the thread, also in
    another test module's, once the window they served is gone."""
    import tkinter as tk
    try:
        pending = widget.tk.splitlist(widget.tk.call('after', 'info'))
    except tk.TclError:
        return
    for afterId in pending:
        try:
            widget.after_cancel(afterId)
        except (tk.TclError, ValueError):
            pass


def resetPyworkflowTk():
    """Forget the Tk objects pyworkflow caches per process: ``pyworkflow.gui.gui.image_cache``
    (PhotoImages) and its named fonts belong to the Tk interpreter they were made in; once it
    is destroyed, a new ``tk.Tk`` gets 'image "pyimage3" doesn't exist' from them."""
    from pyworkflow.gui import gui
    gui.image_cache.clear()
    for name in (gui.FONT_NORMAL, gui.FONT_BOLD, gui.FONT_ITALIC, gui.FONT_FIXED, gui.FONT_BIG,
                 'fontButton'):
        vars(gui).pop(name, None)


def newMainWindow(title: str):
    """A pyworkflow main ``Window`` (hidden ``tk.Tk`` + its Toplevel, as the project window)
    on a fresh Tk interpreter, with no stale pyworkflow images or fonts of an earlier one.
    Close it with :func:`closeTk`."""
    import tkinter as tk
    importlib.import_module('pyworkflow.gui.project')  # imports gui.form without a cycle
    from pyworkflow.gui import Window
    if tk._default_root is not None:   # left by an earlier test: a new interpreter of our own
        closeTk(tk._default_root)
    resetPyworkflowTk()
    window = Window(title)
    quietBackgroundErrors(window.root)
    return window


def closeTk(widget):
    """Close a test's Tk interpreter for good: cancel its pending callbacks, destroy its root
    (every window of it), forget pyworkflow's caches."""
    import tkinter as tk
    if widget is None:
        return
    root = widget._root()
    cancelAfterCallbacks(root)
    try:
        root.destroy()
    except tk.TclError:
        pass
    cancelAfterCallbacks(root)   # any scheduled by <Destroy> handlers
    if tk._default_root is root:
        tk._default_root = None
    resetPyworkflowTk()


def grabWindow(tkWindow, display: str, outPng: str) -> str:
    """Screenshot of a mapped Tk window (its screen rectangle on ``display``) to ``outPng``
    (written atomically)."""
    from PIL import ImageGrab
    for _ in range(20):
        tkWindow.update()
        time.sleep(0.05)
    x, y = tkWindow.winfo_rootx(), tkWindow.winfo_rooty()
    w, h = tkWindow.winfo_width(), tkWindow.winfo_height()
    img = ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=display)
    os.makedirs(os.path.dirname(os.path.abspath(outPng)), exist_ok=True)
    tmp = outPng + '.tmp.png'
    img.save(tmp)
    os.replace(tmp, outPng)
    return outPng


def pngStats(path: str) -> dict:
    from PIL import Image
    img = np.asarray(Image.open(path).convert('RGB'), dtype=np.float64)
    flat = img.reshape(-1, 3).astype(np.uint8)
    _, counts = np.unique(flat, axis=0, return_counts=True)
    return {'shape': img.shape, 'std': float(img.std()), 'colours': len(counts),
            'dominant': float(counts.max() / counts.sum())}


@unittest.skipIf(shutil.which('Xvfb') is None, XVFB_MISSING)
class TestGuiForms(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.outDir = os.path.abspath(cls.proj.getPath('screenshots'))
        os.makedirs(cls.outDir, exist_ok=True)
        cls.docsDir = docsScreenshotDir()
        cls.xvfb = Xvfb.shared()
        cls.oldDisplay = os.environ.get('DISPLAY')
        os.environ['DISPLAY'] = cls.xvfb.display
        cls.shots = {}
        cls.mainWindow = None

    @classmethod
    def tearDownClass(cls):
        if cls.mainWindow is not None:  # the hidden tk.Tk and its (hidden) main Toplevel
            closeTk(cls.mainWindow.root)
            cls.mainWindow = None
        if cls.oldDisplay is None:
            os.environ.pop('DISPLAY', None)
        else:
            os.environ['DISPLAY'] = cls.oldDisplay

    def _save(self, tkWindow, name):
        out = grabWindow(tkWindow, self.xvfb.display, os.path.join(self.outDir, name + '.png'))
        if self.docsDir:
            os.makedirs(self.docsDir, exist_ok=True)
            shutil.copyfile(out, os.path.join(self.docsDir, name + '.png'))
        stats = pngStats(out)
        self.assertGreater(stats['shape'][0], 200, (name, stats))
        self.assertGreater(stats['shape'][1], 200, (name, stats))
        self.assertGreater(stats['std'], 0.0, (name, stats))
        # a form has text, entries and buttons: many colours, none covering the whole window
        self.assertGreater(stats['colours'], 8, (name, stats))
        self.assertLess(stats['dominant'], 0.98, (name, stats))
        return out, stats

    @classmethod
    def _mainWindow(cls):
        if cls.mainWindow is None:
            # one hidden main window for all forms, as the project window is in Scipion (Tk
            # images are cached per interpreter: one tk.Tk for the whole test class)
            cls.mainWindow = newMainWindow('gmmhet form screenshots')
        return cls.mainWindow

    def _openForm(self, protClass):
        cls = type(self)
        cls._mainWindow()   # imports pyworkflow.gui.project first (gui.form has an import cycle)
        from pyworkflow.gui.form import FormWindow
        prot = self.proj.newProtocol(protClass)
        win = FormWindow('Protocol Run: ' + prot.getClassLabel(), prot,
                         lambda *args, **kwargs: None, master=cls.mainWindow)
        win.root.geometry('%dx%d+0+0' % FORM_SIZE)
        win.root.deiconify()
        win.root.lift()
        return win

    def test_forms(self):
        done, missing = [], []
        for module, className, name in PROTOCOLS:
            try:
                mod = importlib.import_module('scipion_gmmhet.protocols.%s' % module)
                protClass = getattr(mod, className)
            except (ImportError, AttributeError) as exc:
                missing.append('%s (%s)' % (className, exc))
                continue
            t0 = time.time()
            win = self._openForm(protClass)
            try:
                out, stats = self._save(win.root, name)
            finally:
                win.root.destroy()
            self.shots[name] = out
            done.append(name)
            print('form %-14s -> %s (%.1f s, %d colours)' % (name, out, time.time() - t0,
                                                              stats['colours']))
        if missing:
            print('forms not available (skipped): %s' % '; '.join(missing))
        # the four protocols of the finished issues must be there
        for name in ('import_poses', 'build_gmm', 'train', 'cluster'):
            self.assertIn(name, done)

    def test_latent_selection_window(self):
        """The interactive selection window on synthetic latents: a lasso polygon selects
        exactly the points inside it (ids, not rows), a point pick shows a map."""
        import tkinter as tk
        from scipion_gmmhet.engine.io.mrc import write_map
        from scipion_gmmhet.viewers.latent_selection import LatentSelectionWindow

        rng = np.random.default_rng(0)
        xy = np.concatenate([rng.normal(size=(150, 2)) * 0.4 + [-2, 0],
                             rng.normal(size=(150, 2)) * 0.4 + [2, 0.5]])
        ids = np.arange(1, 301) * 3 + 7   # ids are not row numbers
        created = []
        mapFn = os.path.join(self.outDir, 'point_map.mrc')
        grid = np.indices((24, 24, 24)).astype(np.float32) - 12
        write_map(mapFn, np.exp(-(grid ** 2).sum(0) / 20.0).astype(np.float32), 4.0)

        root = tk.Toplevel(self._mainWindow().root)
        root.withdraw()
        try:
            win = LatentSelectionWindow(root, ids, xy, ('PC1', 'PC2'),
                                        title='gmmhet: interactive latent selection',
                                        onCreateSubset=lambda sel, label: created.append(
                                            (list(sel), label)) or len(sel),
                                        onPointMap=lambda row: mapFn)
            win.root.geometry('1000x560+0+0')
            polygon = [(-4, -3), (0, -3), (0, 3), (-4, 3)]
            mask = win.applyPolygon(polygon)
            self.assertEqual(int(mask.sum()), int((xy[:, 0] < 0).sum()))
            self.assertEqual(win.selectedIds(), sorted(ids[xy[:, 0] < 0].tolist()))
            row = win.pickPoint(2.0, 0.5)
            self.assertGreater(xy[row, 0], 0)
            self.assertEqual(win.lastMap, mapFn)
            win.nameVar.set('left cluster')
            self.assertEqual(win.createSubset(), int(mask.sum()))
            self.assertEqual(created[0][0], sorted(ids[xy[:, 0] < 0].tolist()))
            self.assertEqual(created[0][1], 'left cluster')
            self._save(win.root, 'latent_selection')
            pending = set(root.tk.splitlist(root.tk.call('after', 'info')))
            win.mode.set('rectangle')
            win._setMode()
            m2 = win.applyRectangle((1, -5), (5, 5))   # leaves a redraw pending: see below
            self.assertEqual(int(m2.sum()), int((xy[:, 0] >= 1).sum()))
            win.root.destroy()
            # the window cancels its pending redraws when closed (else: "invalid command name
            # ...idle_draw" from the next event loop, or Tk's error dialog)
            self.assertLessEqual(set(root.tk.splitlist(root.tk.call('after', 'info'))), pending)
        finally:
            root.destroy()
