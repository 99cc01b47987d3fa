"""The demo's report: how well a finished workflow recovered a simulated dataset's truth.

Results are matched to the simulator's ``truth.csv`` by image (stack file name + index), the
same key that the import protocols use, never by position.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from .engine.io.outputs import BuildFolder, read_json


def _truth_rows_for_star(star_fn: str, truth: pd.DataFrame) -> np.ndarray:
    """For each particle row of a canonical star, the matching row of truth.csv."""
    from .convert import imageKey
    from .engine.io.star import read_star

    parts = read_star(star_fn)["particles"]
    lookup = {}
    for i, name in enumerate(truth["image_name"].astype(str)):
        index, _, stack = name.partition("@")
        lookup[imageKey(stack, int(index))] = i
    rows = []
    for name in parts["rlnImageName"].astype(str):
        index, _, stack = name.partition("@")
        rows.append(lookup[imageKey(stack, int(index))])
    return np.asarray(rows)


def latent_metrics(z: np.ndarray, truth: pd.DataFrame, labels: np.ndarray | None = None) -> dict:
    """|Spearman| of latent PC1 with the true conformation (overall and within each
    composition) and the adjusted Rand index of ``labels`` (or k-means k=2) with the true
    composition, for the columns that truth.csv has."""
    from scipy.stats import spearmanr
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score

    out: dict = {}
    pc = PCA(n_components=min(2, z.shape[1])).fit_transform(z)
    conf = truth["conformation"].to_numpy(float) if "conformation" in truth else None
    comp = truth["composition"].to_numpy(int) if "composition" in truth else None
    if conf is not None and np.nanstd(conf) > 0:
        out["spearman_pc1_conformation"] = float(abs(spearmanr(pc[:, 0], conf).correlation))
        if comp is not None and len(np.unique(comp)) > 1:
            per = []
            for c in np.unique(comp):
                sel = comp == c
                pcs = PCA(n_components=1).fit_transform(z[sel])[:, 0]
                per.append(float(abs(spearmanr(pcs, conf[sel]).correlation)))
            out["spearman_pc1_conformation_within_composition"] = per
            out["spearman_trajectory_conformation_within_composition"] = [
                _trajectory_spearman(z[comp == c], conf[comp == c]) for c in np.unique(comp)]
        else:
            out["spearman_trajectory_conformation"] = _trajectory_spearman(z, conf)
    if comp is not None and len(np.unique(comp)) > 1:
        km = KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(z)
        out["ari_kmeans2_composition"] = float(adjusted_rand_score(comp, km))
        # k-means on PCA-whitened latents: a wide motion no longer outweighs a compositional gap
        white = PCA(whiten=True).fit_transform(z)
        kmw = KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(white)
        out["ari_kmeans2_whitened_composition"] = float(adjusted_rand_score(comp, kmw))
        if labels is not None:
            out["ari_clusters_composition"] = float(adjusted_rand_score(comp, labels))
    return out


def _trajectory_spearman(z: np.ndarray, conf: np.ndarray) -> float:
    """|Spearman| of the data trajectory coordinate (``gmmhet analyze``'s 1-D ordering along the
    latent manifold) with the true conformation."""
    from scipy.stats import spearmanr
    from .engine.analysis.trajectory import manifold_coordinate
    return float(abs(spearmanr(manifold_coordinate(z).coordinate, conf).correlation))


def write_demo_report(out_dir: str, sim: dict, build=None, train=None, cluster=None, refine=None) -> dict:
    """Write ``out_dir/report.md`` and PNG figures for a finished demo workflow."""
    from .viewers import plots

    fig_dir = out_dir
    truth = pd.read_csv(sim["truth_csv"])
    lines = ["# gmmhet demo report", "",
             f"Simulated data: {len(truth)} particles, kind '{sim.get('kind') or _sim_kind(sim)}', "
             f"files in `{os.path.dirname(sim['star'])}`.", ""]
    figures = []
    metrics: dict = {}

    if build is not None:
        summary = BuildFolder(build.getBuildDir()).read_summary()
        fsc = build.getFsc() if hasattr(build, "getFsc") else {}
        lines += ["## Build Gaussian model", "",
                  f"- Gaussians: {summary.get('n_gauss', '?')}, target resolution "
                  f"{summary.get('target_resolution_A', '?')} A, FSC(GMM map, consensus) = 0.5 at "
                  f"{_fmt(summary.get('fsc05_resolution_A'))} A", ""]
        if fsc:
            png = plots.plot_fsc_curves(fsc["freq_invA"], {"GMM map vs consensus": fsc["fsc"]},
                                        os.path.join(fig_dir, "build_fsc.png"), title="Gaussian model fidelity")
            figures.append(png)
        metrics["build"] = summary

    if train is not None:
        z = np.load(train.getLatentFile())
        rows = _truth_rows_for_star(train.getParticlesStar(), truth)
        t = truth.iloc[rows].reset_index(drop=True)
        labels = None
        if cluster is not None:
            by_id = cluster.getLabelsById()
            from .engine.io.star import read_star
            ids = read_star(train.getParticlesStar())["particles"]["rlnGmmhetParticleId"].to_numpy(int)
            labels = np.array([by_id.get(int(i), -1) for i in ids])
        m = latent_metrics(z, t, labels)
        metrics["latent"] = m
        lines += ["## Train heterogeneity", "",
                  f"- Latent dimension {z.shape[1]}, {len(z)} particles, epochs {train.getEpochs()}."]
        for k, v in m.items():
            lines.append(f"- {METRIC_NAMES.get(k, k)}: {_fmt(v)}")
        lines.append("")
        pc, axes = plots.embed_latents(z, "pca")
        if labels is not None and (labels >= 0).any():
            # classes numbered from 1, as in the Scipion GUI
            figures.append(plots.plot_scatter(pc, os.path.join(fig_dir, "latent_pca_classes.png"),
                                              labels=np.where(labels >= 0, labels + 1, 0),
                                              value_label="class", axis_labels=axes,
                                              title="Latent PCA, coloured by class"))
        if "conformation" in t and np.nanstd(t["conformation"].to_numpy(float)) > 0:
            figures.append(plots.plot_scatter(pc, os.path.join(fig_dir, "latent_pca_conformation.png"),
                                              values=t["conformation"].to_numpy(float), axis_labels=axes,
                                              value_label="true conformation", title="Latent PCA"))
        if "composition" in t and t["composition"].nunique() > 1:
            figures.append(plots.plot_scatter(pc, os.path.join(fig_dir, "latent_pca_composition.png"),
                                              labels=t["composition"].to_numpy(int) + 1, axis_labels=axes,
                                              value_label="true composition",
                                              title="Latent PCA, true composition"))
        if os.path.exists(train.getLossFile()):
            figures.append(plots.plot_loss_curves(train.getLossFile(), os.path.join(fig_dir, "training_loss.png")))

    if cluster is not None:
        summary = cluster.getSummary(missingOk=True) or {}
        lines += ["## Cluster and reconstruct", "",
                  "| class | particles | fraction | half-map FSC 0.143 (A) | masked (A) |", "|---|---|---|---|---|"]
        for c in summary.get("clusters", []):
            lines.append(f"| {c['label'] + 1} | {c['size']} | {c['fraction']:.3f} | "
                         f"{_fmt(c.get('resolution_0143_A'))} | {_fmt(c.get('resolution_0143_masked_A'))} |")
        for pc, traj in (summary.get("trajectories") or {}).items():
            lines.append(f"\n- {pc} trajectory: {len(traj.get('maps', []))} maps, largest Gaussian displacement "
                         f"{_fmt(traj.get('max_displacement_A'))} A")
        lines.append("")
        figures += _cluster_figures(cluster, fig_dir)
        metrics["cluster"] = {"clusters": [{k: c.get(k) for k in ("label", "size", "fraction", "resolution_0143_A")}
                                           for c in summary.get("clusters", [])]}

    if refine is not None and hasattr(refine, "getChangeSummary"):
        ch = refine.getChangeSummary() or {}
        lines += ["## Refine orientations", "",
                  f"- {ch.get('n', '?')} particles; angular change median {_fmt(ch.get('angle_median_deg'))} deg "
                  f"(90th percentile {_fmt(ch.get('angle_p90_deg'))}), shift change median "
                  f"{_fmt(ch.get('shift_median_A'))} A (90th percentile {_fmt(ch.get('shift_p90_A'))})", ""]
        metrics["refine"] = ch
        if ch:
            from .viewers.viewer_refine import writeRefineReport
            figures += [p for p in writeRefineReport(refine, fig_dir).values() if p.endswith(".png")]

    lines += ["## Figures", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures]
    report = os.path.join(out_dir, "report.md")
    with open(report + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(report + ".tmp", report)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    return {"report": report, "figures": figures, "metrics": metrics}


#: readable names of latent_metrics' keys
METRIC_NAMES = {
    "spearman_pc1_conformation": "|Spearman| of latent PC1 of all particles with the true conformation "
                                 "(with two compositions PC1 can follow the composition instead)",
    "spearman_pc1_conformation_within_composition":
        "|Spearman| of PC1 with the true conformation, within each composition",
    "spearman_trajectory_conformation_within_composition":
        "|Spearman| of the data trajectory coordinate (gmmhet analyze) with the true conformation, "
        "within each composition",
    "spearman_trajectory_conformation":
        "|Spearman| of the data trajectory coordinate (gmmhet analyze) with the true conformation",
    "ari_kmeans2_composition": "adjusted Rand index, k-means (k=2) vs the true composition",
    "ari_kmeans2_whitened_composition":
        "adjusted Rand index, k-means (k=2) on whitened latents vs the true composition",
    "ari_clusters_composition": "adjusted Rand index, the cluster protocol's classes vs the true composition",
}


def _cluster_figures(cluster, fig_dir: str) -> list[str]:
    """The cluster viewer's figures (latent space by class, class sizes, per-class FSC) and the
    central sections of each class map, classes numbered from 1 as in the GUI."""
    from .viewers.viewer_cluster import classMaps, writeClusterReport
    figures = [p for p in writeClusterReport(cluster, fig_dir).values() if p.endswith(".png")]
    maps = [(label, path) for label, path in classMaps(cluster)
            if label.endswith("reconstruction") and os.path.exists(path)]
    if maps:
        figures.append(_map_sections_png(maps, os.path.join(fig_dir, "class_maps.png")))
    return figures


def _map_sections_png(maps, out_png: str) -> str:
    """One row per map: its three central sections (z, y, x), titled with the map's label."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .engine.io.mrc import read_map
    from .viewers.latent_selection import centralSections
    fig, axes = plt.subplots(len(maps), 1, figsize=(7.5, 2.6 * len(maps)), squeeze=False)
    for ax, (label, path) in zip(axes[:, 0], maps):
        vol, _ = read_map(path)
        ax.imshow(centralSections(np.asarray(vol)), cmap="gray", origin="lower")
        ax.set_title(f"{label}: central sections z, y, x", fontsize="small")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out_png + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(out_png + ".tmp.png", out_png)
    return out_png


def _sim_kind(sim: dict) -> str:
    info = read_json(sim.get("json") or "", {})
    return str(info.get("kind") or info.get("parameters", {}).get("kind", "?"))


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return f"{v:.3f}" if isinstance(v, float) else str(v)
