"""Refine once from given poses (e.g. a round's output) against the ground-truth GMMs and against a
trained network at its training latents, for several ``--min-gain`` values (issue 15 diagnosis).

Usage: WORK STAR TRAIN_DIR GAINS (comma-separated), WORK a ``bench_refine.py`` simulator work folder.
"""
import sys, os, glob, json, numpy as np, pandas as pd
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_refine as br
from scipion_gmmhet.engine.analysis import refine
from scipion_gmmhet.engine.conventions import euler_to_matrix
from scipion_gmmhet.engine.io import metadata
from scipion_gmmhet.engine.io.data import ParticleImages, Particles
from scipion_gmmhet.engine.simulation import simulate
from scipion_gmmhet.engine.training.trained import TrainedModel
work, start, train = sys.argv[1], sys.argv[2], sys.argv[3]
gains = [float(g) for g in sys.argv[4].split(",")]
sim = glob.glob(os.path.join(work, "sim_*"))[0]
truth = pd.read_csv(os.path.join(sim, "truth.csv"))
rot_true = euler_to_matrix(truth["rot"].to_numpy(), truth["tilt"].to_numpy(), truth["psi"].to_numpy())
org_true = truth[["origin_x_A", "origin_y_A"]].to_numpy()
m = metadata.read_particles(start)
apix, box = m.apix, m.box
info = json.load(open(os.path.join(sim, "simulation.json")))
mol = simulate.build_molecule(box, apix, int(info.get("molecule_seed", 0)), 1600)
rot0, org0 = m.rotation_matrices(), m.origins_A()
e0 = br.pose_errors(rot0, org0, rot_true, org_true, apix)
print(f"start {start.replace(work, '')}: {e0['ang_med']:.2f} deg {e0['sh_med_px']:.3f} px", flush=True)
tm = TrainedModel(train)
refs = {"truth": mol.conformation_models(truth["conformation"].to_numpy()),
        "net " + train.replace(work, ""): refine.LatentModels(tm, tm.latents())}
for g in gains:
    for name, mod in refs.items():
        parts = Particles(ParticleImages(m), rot0, org0, box, apix, ctf=m.ctf_params(), ctf_mode="full", device="cpu")
        res = refine.refine_poses(parts, mod, max_angle_deg=6.0, max_shift_A=2.0 * apix, min_gain=g)
        e = br.pose_errors(res.rotations, res.origins_A, rot_true, org_true, apix)
        moved = np.mean((res.delta_angle_deg > 0) | (res.delta_shift_A > 0)) * 100
        print(f"| {name} | min_gain {g:g} | {e0['ang_med']:.2f} -> {e['ang_med']:.2f} deg | {e0['sh_med_px']:.3f} -> {e['sh_med_px']:.3f} px | {moved:.0f}% moved |", flush=True)
