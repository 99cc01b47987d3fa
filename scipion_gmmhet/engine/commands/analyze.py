"""Analyse a trained latent space: embeddings, clusters, maps, trajectories and reconstructions.

Clusters the latents of `gmmhet train` (k-means or a Gaussian mixture, k given), embeds them
(PCA, kept with its inverse, and optionally UMAP), renders the decoded GMM at each cluster
centre and along the principal components (cryoDRGN-style traversal between the 5th and 95th
percentiles), and reconstructs each cluster's particles from the images (direct Fourier
inversion with CTF correction, two half maps, FSC) to check that each state is in the data.
Optional: the motion of a masked domain (--domain-mask) and the even/odd reproducibility test
against a second training on the other half of the particles (--even-odd).

Writes to --out: labels.npy (cluster per star row, 0-based), cluster_XX_rows.txt (the 0-based
star rows of cluster XX, one per line: `gmmhet reconstruct --indices`), embedding_pca.npy (all PCs),
embedding_umap.npy, centers.npy (cluster centres, latent space), cluster_XX_gmm.mrc,
cluster_XX.mrc + _half1/_half2.mrc + _mask.mrc + _fsc.csv, pcN_SS.mrc, pcN_motion.bild/.cmm/.png
(Gaussian displacements from the first to the last trajectory point: ChimeraX arrows, markers,
quiver plot), trajectory.npy (each row's coordinate in [0, 1] along the data manifold, a
diffusion-map ordering like cryoDRGN's graph traversal) with traj_SS.mrc maps along it and
embedding_*_trajectory.png, embedding_*.png and fsc.png, chimerax_clusters.cxc and summary.json (cluster
sizes, centres, resolutions).

Examples:

    gmmhet analyze --train train/ --particles particles.star --clusters 4 --out analysis/
    gmmhet reconstruct --particles particles.star --indices analysis/cluster_00_rows.txt --out cl00.mrc
    gmmhet analyze --train train/ --clusters 0 --no-reconstruct --out embedding_only/
    gmmhet analyze --train train/ --particles particles.star --clusters 2 --method gmm --embedding both --out an2/
    gmmhet analyze --train train/ --particles particles.star --clusters 6 --no-reconstruct --traj-steps 20 --out an3/
    gmmhet analyze --train even/ --even-odd odd/ --particles even.star --clusters 3 --domain-mask arm.mrc --out an4/
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from ..io.atomic import make_output_dir, save_npy, write_text
from ..io.outputs import write_json
from ..errors import InputError

log = logging.getLogger("gmmhet.analyze")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, metavar="DIR", help="output folder of 'gmmhet train'")
    parser.add_argument("--particles", metavar="STAR",
                        help="the star the model was trained on, or a subset of it, in any order (needed for "
                             "reconstructions; its rows are paired with the latents by particle id or image, and "
                             "labels.npy and cluster_XX_rows.txt follow its row order; default: the one recorded "
                             "in DIR/config.json)")
    parser.add_argument("--images-root", metavar="DIR",
                        help="directory the star's image names are relative to (default: the star's folder, "
                             "or the first ancestor holding the first stack)")
    parser.add_argument("--latents", metavar="FILE.npy",
                        help="latent vectors to analyse instead of DIR/latent.npy: (N, K) float, row i = row i "
                             "of --particles (e.g. a subset of the trained particles); needs --particles")
    parser.add_argument("--clusters", type=int, default=0, metavar="K",
                        help="number of clusters (default 0: embeddings and trajectories only)")
    parser.add_argument("--method", choices=["kmeans", "gmm"], default="kmeans",
                        help="clustering: k-means or Gaussian mixture (default kmeans)")
    parser.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=True,
                        help="cluster on the whitened principal components of the latents (those with >= 5%% "
                             "of the variance, scaled to unit variance): separates a compositional gap from a "
                             "wider conformational motion (default on, as in the cluster protocol; "
                             "--no-whiten: the raw latents)")
    parser.add_argument("--embedding", choices=["pca", "umap", "both"], default="pca",
                        help="2-D embeddings to compute and plot (default pca; umap is slower)")
    parser.add_argument("--no-reconstruct", action="store_true", help="skip the per-cluster reconstructions")
    parser.add_argument("--no-gmm-maps", action="store_true", help="skip the cluster-centre GMM maps")
    parser.add_argument("--traj-steps", type=int, default=10, metavar="N",
                        help="maps per principal-component trajectory (0: none; default 10)")
    parser.add_argument("--pcs", type=int, default=2, metavar="P",
                        help="number of principal components to traverse (default 2)")
    parser.add_argument("--no-trajectory", action="store_true",
                        help="skip the 1-D trajectory along the data manifold (diffusion-map coordinate of the "
                             "latents: trajectory.npy, traj_SS.mrc, embedding_*_trajectory.png)")
    parser.add_argument("--domain-mask", metavar="MASK.mrc",
                        help="mask of a domain: find the latent direction that moves it most and the rest least")
    parser.add_argument("--even-odd", metavar="DIR2",
                        help="a second training on the other half of the particles: match clusters between "
                             "the two and report their agreement (reproducibility.json)")
    parser.add_argument("--device", default="cpu", help="torch device for decoding and reconstruction (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed for clustering, UMAP and half splits (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")


def _write_npy(path: str, arr: np.ndarray) -> None:
    save_npy(path, arr)


def _write_cluster_rows(folder, labels: np.ndarray, k: int, n_ops: int) -> None:
    """cluster_XX_rows.txt: the 0-based star rows of each cluster, one per line (the input of
    ``gmmhet reconstruct --indices``). A symmetry-expanded training has n_ops latent rows per
    star row; a star row then goes to the cluster most of its copies fall in."""
    labels = np.asarray(labels).reshape(-1, n_ops) if n_ops > 1 else np.asarray(labels)[:, None]
    votes = np.stack([(labels == c).sum(1) for c in range(k)], axis=1)
    per_row = votes.argmax(1)
    for c in range(k):
        rows = np.nonzero(per_row == c)[0]
        write_text(folder.cluster_rows(c), "".join(f"{r}\n" for r in rows))


def _xy(emb: np.ndarray) -> np.ndarray:
    if emb.shape[1] >= 2:
        return emb[:, :2]
    return np.concatenate([emb, np.zeros_like(emb)], axis=1)


def main(args: argparse.Namespace) -> int:
    from ..io.outputs import AnalysisFolder

    t0 = time.time()
    out = os.path.abspath(args.out)
    if args.clusters < 0:
        raise InputError(f"--clusters {args.clusters}: give 0 (no clustering) or a number of clusters")
    if args.even_odd and args.clusters < 1:
        raise InputError("--even-odd: give --clusters K too (the clusters are matched between the halves)")
    if args.traj_steps < 0 or args.traj_steps == 1:
        raise InputError(f"--traj-steps {args.traj_steps}: give 0 (no trajectories) or at least 2")
    make_output_dir(out)
    folder = AnalysisFolder(out)
    model, info, n_ops, z, star, meta = _inputs(args)
    box, apix = model.neutral.box, model.neutral.apix

    summary = {"train": os.path.abspath(args.train), "particles": os.path.abspath(star) if star else None,
               "n_latents": int(z.shape[0]), "zdim": int(z.shape[1]), "n_ops": n_ops, "box": box, "apix": apix,
               "method": args.method, "k": args.clusters, "seed": args.seed}
    pca, cl, clusters, gmm_maps = _embed_and_cluster(args, model, z, n_ops, folder, summary)
    summary["trajectories"] = _trajectories(args, model, pca, z, folder)
    if not args.no_trajectory and z.shape[0] >= 10:
        summary["manifold_trajectory"] = _manifold_trajectory(model, z, pca, args, folder)
    if args.domain_mask:
        summary["domain_motion"] = _domain_motion(args, model, z, folder)
    _reconstructions(args, meta, n_ops, info, cl, clusters, gmm_maps, folder, apix)
    summary["clusters"] = clusters
    if args.even_odd:
        summary["reproducibility"] = _even_odd(args, model, z, folder, box, apix)
    _chimerax_script(clusters, folder)
    summary["seconds"] = round(time.time() - t0, 2)
    write_json(folder.summary, summary)
    log.info("wrote %s (%.1f s)", folder.summary, summary["seconds"])
    return 0


def _inputs(args):
    """The trained model, its training info, symmetry operators per latent row, the latents to
    analyse, the particle star and its metadata (None when not needed or not given)."""
    from ..io.outputs import TrainFolder
    from ..training.trained import load_trained

    model = load_trained(args.train, args.device)
    info = dict(getattr(model, "info", {}) or {})
    info.update(TrainFolder(args.train).read_config())
    n_ops = int(info.get("n_ops", 1) or 1)
    if args.latents:
        if not args.particles:
            raise InputError("--latents: give --particles too (row i of the latents is row i of that star)")
        if not os.path.exists(args.latents):
            raise InputError(f"--latents {args.latents}: no such file; check the path")
        try:
            z = np.load(args.latents, allow_pickle=False)
        except Exception:
            raise InputError(f"--latents {args.latents}: not a .npy array; save an (N, K) array with numpy") from None
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != model.zdim:
            raise InputError(f"--latents {args.latents}: shape {z.shape}, but the model's latent space has "
                             f"{model.zdim} dimensions; give an (N, {model.zdim}) array")
        n_ops = 1  # one latent row per star row (an expanded star carries the expanded poses)
    else:
        z = np.asarray(model.latents(), dtype=np.float32)
    star = args.particles or info.get("particles")
    box, apix = model.neutral.box, model.neutral.apix
    log.info("latents: %d x %d from %s", z.shape[0], z.shape[1], args.train)

    meta = None
    if star and (not args.no_reconstruct or args.latents or args.particles):
        from ..io.metadata import read_particles
        meta = read_particles(star, images_root=getattr(args, "images_root", None))
        if not args.no_reconstruct:  # missing stacks: say so now, not after the clustering
            meta.validate(require_alignment=True, require_ctf=False, check_images=True, allow_duplicates=n_ops > 1)
        if args.latents and len(meta) != z.shape[0]:
            raise InputError(f"--particles {star}: {len(meta)} particles but --latents {args.latents} has "
                             f"{z.shape[0]} rows; give the latents of these particles, row i = particle row i")
        if meta.box != box or abs(meta.apix - apix) > 1e-3 * apix:
            raise InputError(f"--particles {star}: box {meta.box} at {meta.apix:.4f} A/px but the model is box "
                             f"{box} at {apix:.4f} A/px; give the star the model was trained on")
        if not args.latents:  # the star's rows in its own order: pair by particle identity, never by position
            z = _paired_latents(args.train, star, meta, z, n_ops)
    elif not args.no_reconstruct:
        log.warning("no --particles star (and none recorded in the training): skipping reconstructions")
    return model, info, n_ops, z, star, meta


def _paired_latents(train: str, star: str, meta, z: np.ndarray, n_ops: int) -> np.ndarray:
    """The training latents of the particles of ``star`` in its row order (all ``n_ops`` rows of
    each particle): matched by particle identity (:func:`io.pairing.latent_rows_for`)."""
    from ..io.pairing import latent_rows_for, latents_for
    rows = latent_rows_for(meta, train, n_ops, n_latent_rows=z.shape[0])
    if rows is None:
        raise InputError(f"--particles {star}: its {len(meta)} particles are not all among the "
                         f"{z.shape[0] // max(1, n_ops)} particles the model was trained on; give the star the "
                         "model was trained on (or a subset of it), or pass --latents")
    return latents_for(z, rows, n_ops)


def _embed_and_cluster(args, model, z, n_ops, folder, summary):
    """PCA (and UMAP) embeddings, clustering in the latent space (``--clusters`` > 0), the
    embedding plots and the decoded GMM map at each cluster centre. Returns (pca, clustering or
    None, per-cluster info, {cluster: GMM map})."""
    from ..analysis import latent as an
    from ..analysis.embedding import umap_embedding
    from ..io.mrc import write_map
    box, apix = model.neutral.box, model.neutral.apix

    pca = an.fit_pca(z)
    emb_pca = pca.transform(z).astype(np.float32)
    _write_npy(folder.embedding("pca"), emb_pca)
    summary["pca_explained_variance_ratio"] = pca.explained_variance_ratio_.round(4).tolist()
    embeddings = {"pca": emb_pca}
    if args.embedding in ("umap", "both"):
        tu = time.time()
        emb_umap = umap_embedding(z, seed=args.seed)
        _write_npy(folder.embedding("umap"), emb_umap)
        embeddings["umap"] = emb_umap
        log.info("UMAP of %d points in %.1f s", z.shape[0], time.time() - tu)

    cl = an.cluster_latents(z, args.clusters, args.method, args.seed, whiten=args.whiten) if args.clusters else None
    if cl is not None:
        _write_npy(folder.labels, cl.labels)
        _write_npy(folder.centers, cl.centers)
        _write_cluster_rows(folder, cl.labels, args.clusters, n_ops)
    clusters = []
    for c in range(args.clusters):
        clusters.append({"label": c, "size": int(cl.sizes[c]), "fraction": float(cl.sizes[c] / z.shape[0]),
                         "center": cl.centers[c].round(5).tolist(), "nearest_row": int(cl.nearest_rows[c]),
                         "nearest_latent": z[cl.nearest_rows[c]].round(5).tolist()})
        log.info("cluster %d: %d particles (%.1f%%)", c, cl.sizes[c], 100 * cl.sizes[c] / z.shape[0])
    for name, emb in (embeddings.items() if cl is not None else ()):
        cxy = (pca.transform(cl.centers)[:, :2] if name == "pca" else emb[cl.nearest_rows])
        cxy = _xy(cxy)
        axes = ((f"PC1 ({100 * pca.explained_variance_ratio_[0]:.0f}%)",
                 f"PC2 ({100 * pca.explained_variance_ratio_[1]:.0f}%)" if z.shape[1] > 1 else "")
                if name == "pca" else ("UMAP1", "UMAP2"))
        an.plot_clusters_png(folder.embedding_png(name), _xy(emb), cl.labels, cxy, axes,
                             f"{args.method} clusters, {name.upper()}")

    gmm_maps = {}
    if not args.no_gmm_maps and cl is not None:
        for c, vol in enumerate(an.render_at(model, cl.centers, box, apix)):
            path = folder.cluster_gmm_map(c)
            write_map(path, vol, apix)
            gmm_maps[c] = vol
            clusters[c]["gmm_map"] = os.path.basename(path)
    return pca, cl, clusters, gmm_maps


def _manifold_trajectory(model, z: np.ndarray, pca, args, folder) -> dict:
    """The 1-D coordinate along the data manifold (analysis.trajectory): trajectory.npy (per row),
    maps at equal-count bins along it (traj_SS.mrc), its motion (traj_motion.bild) and the
    embeddings coloured by it (embedding_*_trajectory.png)."""
    from ..analysis import latent as an
    from ..analysis.trajectory import manifold_coordinate, plot_coordinate_png, trajectory_points
    from ..io import chimerax as cx
    from ..io.mrc import write_map

    tr = manifold_coordinate(z, seed=args.seed)
    _write_npy(folder.path("trajectory.npy"), tr.coordinate)
    info = tr.summary()
    pts, t = trajectory_points(z, tr.coordinate, max(2, args.traj_steps or 10))
    _write_npy(folder.path("trajectory_points.npy"), pts)
    names = []
    if args.traj_steps:
        box, apix = model.neutral.box, model.neutral.apix
        for s, vol in enumerate(an.render_at(model, pts, box, apix)):
            names.append(f"traj_{s:02d}.mrc")
            write_map(folder.path(names[-1]), vol, apix)
        c0, d, _ = an.gaussian_displacements(model, pts[0], pts[-1])
        cx.displacement_bild(c0, c0 + d, folder.path("traj_motion.bild"), box, apix, min_length_A=0.5)
        info["max_displacement_A"] = float(np.linalg.norm(d, axis=1).max())
    embeddings = {"pca": pca.transform(z)}
    if os.path.exists(folder.embedding("umap")):
        embeddings["umap"] = np.load(folder.embedding("umap"))
    for name, emb in embeddings.items():
        path_xy = _xy(pca.transform(pts)) if name == "pca" else None
        plot_coordinate_png(folder.path(f"embedding_{name}_trajectory.png"), _xy(emb), tr.coordinate, path_xy,
                            title=f"trajectory coordinate, {name.upper()}")
    info.update({"maps": names, "coordinates": np.round(t, 4).tolist()})
    log.info("manifold trajectory: %d maps; rank correlation with PC1 %.3f", len(names), tr.spearman_pc1)
    return info


def _trajectories(args, model, pca, z, folder) -> dict:
    """Maps along the first principal components and their Gaussian motions (ChimeraX arrows,
    markers, quiver plot)."""
    from ..analysis import latent as an
    from ..io import chimerax as cx
    from ..io.mrc import write_map
    box, apix = model.neutral.box, model.neutral.apix
    trajectories = {}
    if args.traj_steps:
        for pc in range(1, min(args.pcs, z.shape[1]) + 1):
            pts, t = an.pc_trajectory(pca, z, pc, args.traj_steps)
            names = []
            for s, vol in enumerate(an.render_at(model, pts, box, apix)):
                path = folder.trajectory_map(pc, s)
                write_map(path, vol, apix)
                names.append(os.path.basename(path))
            c0, d, _ = an.gaussian_displacements(model, pts[0], pts[-1])
            cx.displacement_bild(c0, c0 + d, folder.trajectory_motion(pc, "bild"), box, apix, min_length_A=0.5)
            cx.displacement_cmm(c0, c0 + d, folder.trajectory_motion(pc, "cmm"), box, apix, name=f"pc{pc}")
            an.plot_quiver_png(folder.trajectory_motion(pc, "png"), c0, d,
                               f"PC{pc}: Gaussian motion, {100 - 2 * 5}% range")
            _write_npy(folder.trajectory_points(pc), pts)
            trajectories[f"pc{pc}"] = {"maps": names, "pc_coordinates": t.round(5).tolist(),
                                       "max_displacement_A": float(np.linalg.norm(d, axis=1).max())}
        log.info("trajectories: %s", ", ".join(f"{k} ({len(v['maps'])} maps, max Gaussian motion %.1f A)"
                                                % v["max_displacement_A"] for k, v in trajectories.items()))
    return trajectories


def _domain_motion(args, model, z, folder) -> dict:
    """The latent direction that moves the --domain-mask domain most and the rest least."""
    from ..analysis import latent as an
    from ..io import chimerax as cx
    from ..io.mrc import read_map, write_map
    from ..io.validate import check_mask_matches
    box, apix = model.neutral.box, model.neutral.apix
    mask, mask_apix = read_map(args.domain_mask)
    check_mask_matches(mask.shape, mask_apix, (box,) * 3, apix, f"--domain-mask {args.domain_mask}",
                       "the Gaussian model")
    inside = an.gaussians_in_mask(model.neutral.centers_A, mask, apix)
    dm = an.domain_motion(model, z, inside, seed=args.seed)
    pts, t = an.direction_trajectory(z, dm.direction, max(2, args.traj_steps or 10))
    names = []
    for s, vol in enumerate(an.render_at(model, pts, box, apix)):
        path = folder.domain_map(s)
        write_map(path, vol, apix)
        names.append(os.path.basename(path))
    c0, d, _ = an.gaussian_displacements(model, pts[0], pts[-1])
    cx.displacement_bild(c0, c0 + d, folder.domain_motion, box, apix, min_length_A=0.5)
    _write_npy(folder.domain_direction, dm.direction)
    result = {"direction": dm.direction.round(5).tolist(), "rayleigh_ratio": dm.ratio,
              "n_gaussians_in_mask": int(inside.sum()), "rms_in_A_per_unit": dm.rms_in_A,
              "rms_out_A_per_unit": dm.rms_out_A, "maps": names}
    log.info("domain motion: %d Gaussians in the mask, in/out motion ratio %.2f", inside.sum(),
             dm.rms_in_A / max(1e-12, dm.rms_out_A))
    return result


def _reconstructions(args, meta, n_ops, info, cl, clusters, gmm_maps, folder, apix) -> None:
    """Each cluster's particles reconstructed from the images (half maps, FSC); fills
    ``clusters``."""
    from ..analysis import latent as an
    from ..model.fourier import fsc_table
    recon_tables = {}
    if args.no_reconstruct:
        meta = None
    if meta is not None and n_ops > 1:
        log.warning("symmetry-expanded training (%d operators): per-cluster reconstructions need the expanded "
                    "poses and are skipped", n_ops)
    elif meta is not None:
        from ..analysis.reconstruct import half_assignment, normalise_ctf_mode, reconstruct_particles
        halves = half_assignment(meta, args.seed)
        ctf_mode = normalise_ctf_mode((info.get("train") or {}).get("ctf_mode"))
        for c in range(args.clusters):
            rows = np.nonzero(cl.labels == c)[0]
            if rows.size < 2:
                log.warning("cluster %d has %d particle(s): no reconstruction", c, rows.size)
                continue
            rec = reconstruct_particles(meta, rows, halves=halves, device=args.device, ctf_mode=ctf_mode,
                                        seed=args.seed)
            paths = rec.write(folder.cluster_map(c))
            recon_tables[f"cluster {c}"] = rec.fsc
            clusters[c].update({"map": os.path.basename(paths["map"]),
                                "half1": os.path.basename(paths["half1"]),
                                "half2": os.path.basename(paths["half2"]),
                                "fsc_csv": os.path.basename(paths["fsc"]),
                                "resolution_0143_A": float(rec.resolution_0143_A),
                                "resolution_0143_masked_A": float(rec.resolution_0143_masked_A),
                                "half_sizes": list(rec.half_sizes)})
            if c in gmm_maps:
                tg = fsc_table(rec.volume, gmm_maps[c], apix)
                clusters[c]["fsc05_vs_gmm_A"] = an.safe_resolution(tg, 0.5)
            log.info("cluster %d: reconstruction from %d particles, FSC 0.143 resolution %.2f A (masked %.2f A) "
                     "(%.1f s)", c, rows.size, rec.resolution_0143_A, rec.resolution_0143_masked_A, rec.seconds)
        if recon_tables:
            an.plot_fsc_png(folder.fsc_png, recon_tables, "half-map FSC per cluster")


def _even_odd(args, model, z, folder, box, apix) -> dict:
    """The even/odd reproducibility test against the --even-odd training."""
    from ..analysis import latent as an
    from ..training.trained import load_trained
    model_b = load_trained(args.even_odd, args.device)
    rep = an.even_odd_report(model, z, model_b, np.asarray(model_b.latents()), args.clusters, args.method,
                             args.seed, box, apix)
    write_json(folder.reproducibility, rep)
    result = {"max_population_diff": rep["max_population_diff"], "min_fsc_area": rep["min_fsc_area"]}
    log.info("even/odd: matched clusters' FSC area >= %.3f, population difference <= %.1f%%",
             rep["min_fsc_area"], 100 * rep["max_population_diff"])
    return result


def _chimerax_script(clusters, folder) -> None:
    """ChimeraX command file opening the cluster maps together."""
    lines = []
    for c, cinfo in enumerate(clusters):
        for key in ("map", "gmm_map"):
            if key in cinfo:
                lines.append(f"open {cinfo[key]}")
    if lines:
        lines += ["volume all step 1", "tile"]
        write_text(folder.chimerax_script, "\n".join(lines) + "\n")
