"""``make demo``: simulate a heterogeneous dataset, run the whole gmmhet workflow headless in a
Scipion project through Scipion's own protocol launcher, and write a short report.

    python -m scipion_gmmhet.demo --out demo-output            # what `make demo` runs
    python -m scipion_gmmhet.demo --out /tmp/d --n 1000 --epochs 10 --kind conformational

Workflow (each step is a real Scipion protocol run by ``project.launchProtocol``):
import particles from a RELION star (pwem + scipion-em-relion) -> import the consensus map ->
gmmhet build Gaussian model -> gmmhet train heterogeneity -> gmmhet cluster and reconstruct ->
gmmhet refine orientations. The report (``<out>/report.md`` and PNG figures) compares the
results with the simulator's ground truth.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time



def _log(msg: str) -> None:
    print(f"[gmmhet demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _launch(project, prot, what: str):
    t0 = time.time()
    project.launchProtocol(prot, wait=True)
    prot = project.getProtocol(prot.getObjId())
    if not prot.isFinished():
        logs = prot.getLogPaths()
        tail = ""
        for fn in logs[:2]:
            if os.path.exists(fn):
                with open(fn, errors="replace") as f:
                    tail += "".join(f.readlines()[-25:])
        raise SystemExit(f"demo: the protocol '{what}' ended as {prot.getStatus()}; its log ends with:\n{tail}")
    _log(f"{what}: finished in {time.time() - t0:.0f} s")
    return prot


def _new(project, protClass, label: str, **params):
    """A new protocol titled ``label`` in the project graph (newProtocol titles it by class)."""
    prot = project.newProtocol(protClass, **params)
    prot.setObjLabel(label)
    return prot


def _pointer(prot, attr: str, src, ext: str) -> None:
    getattr(prot, attr).set(src)
    getattr(prot, attr).setExtended(ext)


def run(args) -> dict:
    import pyworkflow
    if not pyworkflow.Config.SCIPION_DOMAIN:  # run outside the `scipion` launcher
        pyworkflow.Config.setDomain("pwem")
    from pwem.protocols import ProtImportParticles, ProtImportVolumes
    from pyworkflow.project import Manager

    from .engine.simulation.simulate import simulate
    from .protocols import (ProtGmmhetBuildGmm, ProtGmmhetCluster, ProtGmmhetRefine,
                            ProtGmmhetTrain)
    from .convert import writeRelionImportStar

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "data")
    if os.path.exists(data_dir):
        shutil.rmtree(data_dir)
    _log(f"simulating {args.n} '{args.kind}' particles (box {args.box}, SNR {args.snr}) into {data_dir}")
    sim = simulate(data_dir, args.kind, n=args.n, box=args.box, apix=args.apix, snr=args.snr, seed=args.seed)
    star = writeRelionImportStar(sim["star"], os.path.join(out, "import", "particles.star"))

    manager = Manager()
    if manager.hasProject(args.project):
        manager.deleteProject(args.project)
    project = manager.createProject(args.project)
    os.chdir(project.getPath())  # pyworkflow resolves a project's files from inside its folder
    _log(f"Scipion project '{args.project}' at {project.getPath()}")
    use_gpu = _cuda_available()

    imp = _new(project, ProtImportParticles, "import particles (RELION star)",
                              importFrom=ProtImportParticles.IMPORT_FROM_RELION, starFile=star,
                              samplingRate=args.apix, voltage=300.0, sphericalAberration=2.7,
                              amplitudeContrast=0.1)
    imp = _launch(project, imp, "import particles")
    vol = _new(project, ProtImportVolumes, "import consensus map",
                              filesPath=sim["consensus"], samplingRate=args.apix)
    vol = _launch(project, vol, "import consensus map")

    build = _new(project, ProtGmmhetBuildGmm, "gmmhet - build Gaussian model",
                                resolution=args.resolution, useGpu=use_gpu)
    _pointer(build, "inputVolume", vol, "outputVolume")
    build = _launch(project, build, "build Gaussian model")

    train = _new(project, ProtGmmhetTrain, "gmmhet - train heterogeneity",
                                zDim=args.zdim, numberOfEpochs=args.epochs, useGpu=use_gpu)
    _pointer(train, "inputParticles", imp, "outputParticles")
    _pointer(train, "inputGmm", build, "outputVolume")
    train = _launch(project, train, "train heterogeneity")

    cluster = _new(project, ProtGmmhetCluster, "gmmhet - cluster and reconstruct",
                                  numberOfClusters=args.clusters, useGpu=use_gpu)
    _pointer(cluster, "inputParticles", train, "outputParticles")
    cluster = _launch(project, cluster, "cluster and reconstruct")

    refine = _new(project, ProtGmmhetRefine, "gmmhet - refine orientations", useGpu=use_gpu)
    _pointer(refine, "inputParticles", train, "outputParticles")
    refine = _launch(project, refine, "refine orientations")

    from .report import write_demo_report
    report = write_demo_report(out, sim, build=build, train=train, cluster=cluster, refine=refine)
    _log(f"report: {report['report']}")
    return {"project": args.project, "project_path": project.getPath(), **report}


def guiCommand(project: str = "gmmhet_demo") -> str:
    """A shell command that opens ``project`` in the Scipion GUI as printed, the same as ``make
    gui``: with ``-O`` Scipion opens the window in this process and the command returns when the
    window is closed (without it Scipion relaunches itself detached with the first ``python3`` on
    PATH, so this interpreter's folder goes first either way)."""
    import shlex
    home = os.environ.get("SCIPION_HOME", "")
    env = f"SCIPION_HOME={shlex.quote(home)} " if home else ""
    data = os.environ.get("SCIPION_USER_DATA", "")
    env += f"SCIPION_USER_DATA={shlex.quote(data)} " if data else ""
    bindir = os.path.dirname(sys.executable)
    return (f"{env}PATH={shlex.quote(bindir)}:\"$PATH\" {shlex.quote(sys.executable)} "
            f"-O -m scipion project {shlex.quote(project)}")


def _cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # torch missing is reported by the protocols' own validation
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scipion_gmmhet.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-output", help="output folder for data, report and figures")
    p.add_argument("--project", default="gmmhet_demo", help="Scipion project name (replaced if it exists)")
    p.add_argument("--kind", default="mixed", choices=["homogeneous", "conformational", "compositional", "mixed"])
    p.add_argument("--n", type=int, default=1500, help="number of particles")
    p.add_argument("--box", type=int, default=64, help="box size (px)")
    p.add_argument("--apix", type=float, default=3.0, help="pixel size (A)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=float, default=12.0, help="GMM target resolution (A)")
    p.add_argument("--zdim", type=int, default=4)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--clusters", type=int, default=2)
    args = p.parse_args(argv)
    t0 = time.time()
    result = run(args)
    print()
    print(f"Demo finished in {(time.time() - t0) / 60:.1f} min.")
    print(f"  Report:   {result['report']}")
    print(f"  Figures:  {os.path.dirname(result['report'])}/*.png")
    print(f"  Project:  {result['project_path']}")
    print(f"  Open it in the Scipion GUI:  make gui   (from the repository), or\n"
          f"    {guiCommand(result['project'])}")
    with open(os.path.join(os.path.abspath(args.out), "demo.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if isinstance(v, (str, int, float, dict, list))}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
