"""Live 3D latent explorer: pointer updates per second on the CPU (target >= 10/s at 2,048
Gaussians), through the real Tk window under Xvfb with synthetic pointer-motion events.

Each update = Tk motion event -> matplotlib motion_notify_event -> plot point -> latent (PCA
inverse) -> decoder on the CPU -> 3D scatter of the Gaussians coloured by displacement from
neutral -> Tk canvas redraw. Events are sent one per Tk idle loop, as a moving pointer does.

    python benchmarks/bench_explorer3d.py                  # builds a 2,048-Gaussian model (1 min)
    python benchmarks/bench_explorer3d.py --train DIR      # an existing `gmmhet train` folder
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def small_trained_model(work: str, n_gauss: int) -> str:
    """simulate (200 particles, box 48) -> build (n_gauss Gaussians) -> train 1 epoch."""
    from scipion_gmmhet.engine.cli import main
    sim = os.path.join(work, "sim")
    assert main(["simulate", "--out", sim, "--kind", "conformational", "--n", "200", "--box", "48",
                 "--snr", "1", "--seed", "0"]) == 0
    assert main(["build", "--map", os.path.join(sim, "consensus.mrc"), "--resolution", "8",
                 "--n-gauss", str(n_gauss), "--steps", "10", "--device", "cpu", "-o", os.path.join(work, "gmm")]) == 0
    assert main(["train", "--particles", os.path.join(sim, "particles.star"), "--gmm", os.path.join(work, "gmm"),
                 "--epochs", "1", "--device", "cpu", "-o", os.path.join(work, "train")]) == 0
    return os.path.join(work, "train")


def drive(win, n_events: int = 60) -> dict:
    """Move the pointer across the latent plot with Tk motion events; returns the rates."""
    widget = win.canvas.get_tk_widget()
    win.root.update()
    bbox = win.ax.get_window_extent()
    h = widget.winfo_height()
    xs = np.linspace(bbox.x0 + 5, bbox.x1 - 5, n_events)
    ys = h - np.linspace(bbox.y0 + 5, bbox.y1 - 5, n_events)   # Tk y runs downwards
    panel = win.explorer3d
    panel.updates, panel.seconds = 0, 0.0
    t0 = time.perf_counter()
    for x, y in zip(xs, ys):
        widget.event_generate("<Motion>", x=int(x), y=int(y))
        win.root.update()
    wall = time.perf_counter() - t0
    return {"events": n_events, "updates": panel.updates, "wall_s": wall,
            "updates_per_s": panel.updates / wall, "draw_updates_per_s": panel.updatesPerSecond(),
            "gaussians": len(panel.explorer.neutral)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", help="a gmmhet train folder (default: build a small one)")
    p.add_argument("--n-gauss", type=int, default=2048)
    p.add_argument("--events", type=int, default=60)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="gmmhet_explorer_")
    xvfb = None
    try:
        train = args.train or small_trained_model(work, args.n_gauss)
        if not os.environ.get("DISPLAY"):
            from scipion_gmmhet.tests.test_gui_forms import Xvfb
            xvfb = Xvfb()
            os.environ["DISPLAY"] = xvfb.start()
        import matplotlib
        matplotlib.use("TkAgg")
        from scipion_gmmhet.engine.training.trained import load_trained
        from scipion_gmmhet.viewers import plots
        from scipion_gmmhet.viewers.explorer3d import LatentExplorer
        from scipion_gmmhet.viewers.latent_selection import LatentSelectionWindow
        z = load_trained(train, device="cpu").latents()
        xy, axes = plots.embed_latents(z, "pca")
        explorer = LatentExplorer.fromTrainDir(train, z, xy, "pca", saveMapDir=work)
        win = LatentSelectionWindow(None, np.arange(1, len(z) + 1), xy, axes, explorer=explorer)
        win.root.geometry("1270x600+0+0")
        res = drive(win, args.events)
        win.root.destroy()
        print("live 3D explorer, %(gaussians)d Gaussians, CPU (1 torch thread): %(updates)d updates from "
              "%(events)d pointer events in %(wall_s).2f s = %(updates_per_s).1f updates/s "
              "(decode + redraw alone: %(draw_updates_per_s).1f/s)" % res)
        return 0 if res["updates_per_s"] >= 10 else 1
    finally:
        if xvfb is not None:
            xvfb.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
