"""Prototype for issue 15 (not an engine default): an automatic rigid core from the FIRST trained
network, written as a focus mask, then ``gmmhet refine --rounds auto --mask CORE`` (defaults
otherwise), scored against the truth of a ``bench_refine.py`` work folder.

Usage: WORK STAR TRAIN_DIR METRIC K [extra gmmhet refine args]. METRIC ``raw``: each Gaussian's
RMS motion (A) of its decoded centres about their mean over the training latents, no fit removed;
``affine``: :func:`rigid_core.gaussian_motion_A` (robust affine fit removed, the engine's metric).
Core: motion <= median + K * 1.4826 MAD (the engine's ``rigid_core`` uses the affine metric, K = 3).
Mask: the nearest voxel of each core Gaussian's centre (``focus_mask_gaussians`` reads it back).
"""
import sys, os, glob, json, numpy as np, pandas as pd, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_refine as br
from scipion_gmmhet.engine import cli
from scipion_gmmhet.engine.analysis import refine
from scipion_gmmhet.engine.analysis.rigid_core import gaussian_motion_A
from scipion_gmmhet.engine.conventions import euler_to_matrix
from scipion_gmmhet.engine.io import metadata
from scipion_gmmhet.engine.io.mrc import write_map
from scipion_gmmhet.engine.io.outputs import RefineFolder
from scipion_gmmhet.engine.simulation import simulate
from scipion_gmmhet.engine.training.trained import TrainedModel
from scipion_gmmhet.engine.training.features import focus_mask_gaussians
work, star, train, metric, k = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
extra = sys.argv[6:]
sim = (glob.glob(os.path.join(work, "sim_*")) + glob.glob(os.path.join(work, "hinge_*")))[0]
truth = pd.read_csv(os.path.join(sim, "truth.csv"))
rot_true = euler_to_matrix(truth["rot"].to_numpy(), truth["tilt"].to_numpy(), truth["psi"].to_numpy())
org_true = truth[["origin_x_A", "origin_y_A"]].to_numpy()
info = json.load(open(os.path.join(sim, "simulation.json")))
tm = TrainedModel(train)
mol = (simulate.build_molecule(tm.neutral.box, tm.neutral.apix, int(info.get("molecule_seed", 0)), 1600)
       if "hinge" not in sim else None)
mod = refine.LatentModels(tm, tm.latents())
if metric == "raw":
    c = tm.decode(torch.as_tensor(tm.latents()))[0].numpy()
    mo = np.sqrt(((c - c.mean(0)) ** 2).sum(-1).mean(0))
else:
    mo = gaussian_motion_A(mod)
med = np.median(mo); mad = np.median(np.abs(mo - med)) * 1.4826
core = mo <= med + k * mad
arm = np.zeros(len(mo), bool)
if mol is not None:
    arm[mol.arm_slice()] = True
box, apix = tm.neutral.box, tm.neutral.apix
vol = np.zeros((box,) * 3, np.float32)
idx = np.rint(tm.neutral.centers_A / apix).astype(int) + box // 2
for (x, y, z) in idx[core]:
    vol[z, y, x] = 1.0
tag = f"{metric}_k{k:g}" + "".join(extra).replace("-", "_")
mask = os.path.join(work, f"automask_{tag}.mrc")
write_map(mask, vol, apix)
sel = np.zeros(len(mo), bool); sel[focus_mask_gaussians(tm.neutral, mask)] = True
out = os.path.join(work, f"refine_automask_{tag}_{os.path.basename(star)}")
rc = cli.main(["refine", "--train", train, "--particles", star, "--out", out, "--mask", mask, "--device", "cpu"] + extra)
m0 = metadata.read_particles(star)
m1 = metadata.read_particles(RefineFolder(out).particles)
e0 = br.pose_errors(m0.rotation_matrices(), m0.origins_A(), rot_true, org_true, apix)
e1 = br.pose_errors(m1.rotation_matrices(), m1.origins_A(), rot_true, org_true, apix)
rounds = []
f = RefineFolder(out)
if os.path.exists(f.rounds):
    for r in range(1, len(pd.read_csv(f.rounds)) + 1):
        p = f.round(r).particles
        mr = metadata.read_particles(p if os.path.exists(p) else f.particles)
        rounds.append(br.pose_errors(mr.rotation_matrices(), mr.origins_A(), rot_true, org_true, apix)["ang_med"])
from scipion_gmmhet.engine.io.mrc import read_map
truth_map, _ = read_map(os.path.join(sim, "consensus.mrc"))
f0, f1 = br.fsc_vs_truth(m0, truth_map, "cpu"), br.fsc_vs_truth(m1, truth_map, "cpu")
moved = np.mean(np.any(np.abs(m1.euler_deg() - m0.euler_deg()) > 1e-3, 1) | np.any(np.abs(m1.origins_A() - m0.origins_A()) > 1e-3, 1)) * 100
print(f"RESULT | {metric} k={k:g} {' '.join(extra)} | core {sel.sum()} of {len(sel)} (arm in core {(sel & arm).sum()} of {arm.sum()}) | "
      f"{e0['ang_med']:.2f} -> {e1['ang_med']:.2f} deg ({100*(e1['ang_med']/max(e0['ang_med'],1e-9)-1):+.0f}%) | {e0['sh_med_px']:.3f} -> {e1['sh_med_px']:.3f} px | rounds {' -> '.join(f'{v:.2f}' for v in rounds)} | {moved:.1f}% changed | FSC mean vs truth {f0['fsc_mean']:.4f} -> {f1['fsc_mean']:.4f} |", flush=True)
