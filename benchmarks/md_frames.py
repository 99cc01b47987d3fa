"""Frames of a CHARMM/NAMD molecular-dynamics trajectory (DCD + PSF) as a multi-model PDB file,
the input of ``gmmhet simulate --kind trajectory``.

The benchmark's trajectory is MDAnalysis' test trajectory of adenylate kinase closing
(``adk_dims.dcd`` with ``adk.psf``: 98 frames of a dynamic-importance-sampling transition from the
open 4AKE to the closed 1AKE structure, 3,341 atoms with hydrogens; MDAnalysis/mdanalysis on
GitHub, ``testsuite/MDAnalysisTests/data/``). Heavy atoms only (mass > 1.5 Da), element from the
PSF's mass, residue numbers and names from the PSF. Both files are read as data (numpy, no
pickles); nothing of MDAnalysis' code is used.

    python benchmarks/md_frames.py --dcd adk_dims.dcd --psf adk.psf --out adk_dims_frames.pdb
    gmmhet simulate --kind trajectory --pdb adk_dims_frames.pdb --out md --n 6000 --apix 1.5
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ELEMENT_BY_MASS = ((11.5, 12.5, "C"), (13.5, 14.5, "N"), (15.5, 16.5, "O"), (31.5, 32.5, "S"), (30.5, 31.5, "P"))


def read_psf_atoms(path: str) -> dict:
    """``{'resseq', 'resname', 'name', 'element'}`` per atom of a PSF file (its !NATOM block)."""
    with open(path) as f:
        lines = f.read().splitlines()
    start = next(i for i, ln in enumerate(lines) if "!NATOM" in ln)
    n = int(lines[start].split()[0])
    res, resn, name, el = [], [], [], []
    for ln in lines[start + 1:start + 1 + n]:
        p = ln.split()
        mass = float(p[7])
        res.append(int(p[2]))
        resn.append(p[3])
        name.append(p[4])
        el.append(next((e for lo, hi, e in ELEMENT_BY_MASS if lo <= mass < hi), "H" if mass < 1.5 else "C"))
    return {"resseq": np.asarray(res), "resname": np.asarray(resn), "name": np.asarray(name),
            "element": np.asarray(el)}


def read_dcd(path: str) -> np.ndarray:
    """Coordinates ``(frames, atoms, 3)`` float32 Angstrom of a CHARMM/NAMD DCD file (little-endian
    Fortran records; the unit-cell record of each frame, when present, skipped)."""
    raw = np.fromfile(path, dtype=np.uint8)
    pos = 0

    def record() -> bytes:
        nonlocal pos
        size = int(raw[pos:pos + 4].view("<i4")[0])
        body = raw[pos + 4:pos + 4 + size].tobytes()
        if int(raw[pos + 4 + size:pos + 8 + size].view("<i4")[0]) != size:
            raise ValueError(f"{path}: not a little-endian DCD file (record markers differ)")
        pos += size + 8
        return body

    head = record()
    if head[:4] != b"CORD":
        raise ValueError(f"{path}: no CORD header; not a DCD coordinate file")
    icntrl = np.frombuffer(head[4:84], dtype="<i4")
    has_cell = bool(icntrl[19]) and bool(icntrl[10])
    record()                                                   # title
    n_atoms = int(np.frombuffer(record(), dtype="<i4")[0])
    frames = []
    while pos < len(raw):
        if has_cell:
            record()
        xyz = [np.frombuffer(record(), dtype="<f4") for _ in range(3)]
        if any(len(a) != n_atoms for a in xyz):
            raise ValueError(f"{path}: a frame has {len(xyz[0])} atoms, the header {n_atoms}")
        frames.append(np.stack(xyz, 1))
    return np.stack(frames)


def write_models(path: str, frames: np.ndarray, atoms: dict) -> None:
    """One PDB MODEL per frame (chain A, heavy atoms in ``atoms``' order)."""
    with open(path + ".tmp", "w") as f:
        for k, xyz in enumerate(frames, 1):
            f.write(f"MODEL     {k:4d}\n")
            for i, (x, y, z) in enumerate(xyz):
                nm = atoms["name"][i]
                nm = f" {nm:<3s}" if len(nm) < 4 else nm[:4]
                f.write(f"ATOM  {(i + 1) % 100000:5d} {nm:4s} {atoms['resname'][i]:>3s} A{atoms['resseq'][i]:4d}    "
                        f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {atoms['element'][i]:>2s}\n")
            f.write("ENDMDL\n")
        f.write("END\n")
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dcd", required=True)
    p.add_argument("--psf", required=True)
    p.add_argument("--out", required=True, help="multi-model PDB to write")
    p.add_argument("--every", type=int, default=1, help="keep every k-th frame")
    a = p.parse_args(argv)
    atoms = read_psf_atoms(a.psf)
    frames = read_dcd(a.dcd)[::a.every]
    if frames.shape[1] != len(atoms["name"]):
        sys.exit(f"--psf {a.psf}: {len(atoms['name'])} atoms, the trajectory {frames.shape[1]}; give the matching PSF")
    heavy = atoms["element"] != "H"
    write_models(a.out, frames[:, heavy], {k: v[heavy] for k, v in atoms.items()})
    print(f"{a.out}: {len(frames)} frames x {int(heavy.sum())} heavy atoms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
