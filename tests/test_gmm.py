"""Tests of gmm.py (render, separable projection, file) and fourier.py (FRC/FSC bookkeeping).

The projection is checked against an independent real-space computation: the rendered map is
rotated by trilinear interpolation (scipy) with the RELION matrix and summed along the viewing
axis, then shifted by the RELION origin, all in real space.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from scipion_gmmhet.engine import conventions
from scipion_gmmhet.engine.model import fourier, gmm


def _random_gmm(n=40, box=32, apix=3.0, seed=0, sigma=(3.0, 5.0)):
    rng = np.random.default_rng(seed)
    half = box * apix / 2
    centers = rng.uniform(-0.45 * half, 0.45 * half, (n, 3)).astype(np.float32)
    amps = rng.uniform(0.5, 1.5, n).astype(np.float32)
    sigmas = rng.uniform(*sigma, n).astype(np.float32)
    return gmm.GMM(centers, amps, sigmas, box, apix)


def _real_space_projection(vol, A, origin_A, apix):
    """Project ``vol[z, y, x]`` independently: sample the map at ``A.T @ (u + ox, v + oy, w)``
    (trilinear) on the image grid and sum over ``w`` (voxel sums)."""
    box = vol.shape[0]
    t = (np.arange(box) - box // 2) * apix
    u, v, w = np.meshgrid(t, t, t, indexing="xy")  # u: image x, v: image y; arrays [v, u, w]
    pts = np.stack([u + origin_A[0], v + origin_A[1], w], axis=-1) @ A  # rows p with A @ p = (u, v, w)
    idx = pts / apix + box // 2  # x, y, z voxel coordinates
    coords = np.stack([idx[..., 2], idx[..., 1], idx[..., 0]])
    samples = ndimage.map_coordinates(vol, coords.reshape(3, -1), order=1, mode="constant").reshape(u.shape)
    return samples.sum(axis=2)  # [y, x]


def test_render_matches_formula():
    g = _random_gmm(n=5, box=24, apix=2.0, seed=3)
    vol = g.render()
    t = (np.arange(24) - 12) * 2.0
    z, y, x = np.meshgrid(t, t, t, indexing="ij")
    ref = np.zeros_like(vol, dtype=np.float64)
    for c, a, s in zip(g.centers_A, g.amplitudes, g.sigmas_A):
        ref += a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    np.testing.assert_allclose(vol, ref, rtol=1e-4, atol=1e-5)


def test_render_other_box_and_apix():
    g = _random_gmm(n=10, box=32, apix=3.0)
    big = g.render(box=48, apix=2.0)
    assert big.shape == (48, 48, 48)
    # same physical point, centre voxel of both grids
    assert abs(big[24, 24, 24] - g.render()[16, 16, 16]) < 1e-4 * max(1.0, abs(big[24, 24, 24]))


@pytest.mark.parametrize("seed", [0, 1])
def test_projection_matches_real_space_projection(seed):
    box, apix = 32, 3.0
    g = _random_gmm(n=30, box=box, apix=apix, seed=seed)
    vol = g.render()
    rng = np.random.default_rng(100 + seed)
    B = 4
    rot, psi = rng.uniform(-180, 180, B), rng.uniform(-180, 180, B)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, B)))
    A = conventions.euler_to_matrix(rot, tilt, psi)  # (B, 3, 3)
    origins = rng.uniform(-6.0, 6.0, (B, 2))  # Angstrom, sub-pixel
    c, a, s = g.tensors()
    F = gmm.project(c, a, s, torch.as_tensor(A, dtype=torch.float32), box, apix,
                    origins_A=torch.as_tensor(origins, dtype=torch.float32))
    imgs = conventions.fourier_to_image(F, box).numpy()
    for b in range(B):
        ref = _real_space_projection(vol, A[b], origins[b], apix)
        cc = np.corrcoef(imgs[b].ravel(), ref.ravel())[0, 1]
        assert cc >= 0.99, (b, cc)
        # same scale too (voxel sums), within interpolation error
        assert abs(imgs[b].sum() / ref.sum() - 1) < 0.02


def test_projection_shift_direction():
    """A Gaussian at the centre, projected with origin (+6, 0) A, lands at x = -6 A (RELION:
    the particle's centre lies at -origin in the raw image)."""
    box, apix = 32, 2.0
    c = torch.zeros(1, 3)
    F = gmm.project(c, torch.ones(1), torch.full((1,), 2.0), torch.eye(3)[None], box, apix,
                    origins_A=torch.tensor([[6.0, 0.0]]))
    img = conventions.fourier_to_image(F, box)[0].numpy()
    y, x = np.unravel_index(np.argmax(img), img.shape)
    assert (x - box // 2) * apix == pytest.approx(-6.0)
    assert y == box // 2


def test_separable_equals_naive():
    box, apix = 24, 2.5
    g = _random_gmm(n=25, box=box, apix=apix, seed=5, sigma=(2.0, 4.0))
    rng = np.random.default_rng(7)
    B = 3
    A = torch.as_tensor(conventions.euler_to_matrix(*rng.uniform(-180, 180, (3, B))), dtype=torch.float32)
    origins = torch.as_tensor(rng.uniform(-5, 5, (B, 2)), dtype=torch.float32)
    ky, kx = conventions.fourier_grid(box, apix)
    ctf = conventions.ctf_2d(ky, kx, torch.full((B,), 12000.0), torch.full((B,), 11000.0),
                             torch.full((B,), 20.0), 300.0, 2.7, 0.1)
    c, a, s = g.tensors()
    # per-particle centres exercise the (B, N, 3) path
    cb = c[None] + torch.as_tensor(rng.normal(0, 1, (B, len(g), 3)), dtype=torch.float32)
    for cc in (c, cb):
        F1 = gmm.project(cc, a, s, A, box, apix, origins_A=origins, ctf=ctf)
        F2 = gmm.project_naive(cc, a, s, A, box, apix, origins_A=origins, ctf=ctf)
        scale = F2.abs().max()
        assert float((F1 - F2).abs().max() / scale) < 1e-4


def test_projection_is_differentiable():
    g = _random_gmm(n=8, box=16, apix=3.0)
    c, a, s = (t.clone().requires_grad_(True) for t in g.tensors())
    F = gmm.project(c, a, s, torch.eye(3)[None].repeat(2, 1, 1), 16, 3.0)
    F.abs().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (c, a, s))


# Golden CTF values computed by hand from RELION's CTF::getCTF formula (see conventions.py):
# 300 kV (lambda = 0.0196876 A), Cs 2.7 mm, Q0 0.1, dU 15000 A, dV 14000 A, angle 30 deg.
# At (kx, ky) = (0.05, 0): alpha = 0, dz = -14500 - 500 cos(-60 deg) = -14750 A.
CTF_GOLDEN = [((0.05, 0.0), 0.6908847), ((0.0, 0.1), 0.5169490), ((0.07, -0.07), 0.7373950)]


def test_ctf_golden_values():
    box, apix = 100, 1.0  # frequency step 0.01 1/A: every golden point is a grid point
    ky, kx = conventions.fourier_grid(box, apix, dtype=torch.float64)
    ctf = conventions.ctf_2d(ky, kx, torch.tensor([15000.0], dtype=torch.float64),
                             torch.tensor([14000.0], dtype=torch.float64),
                             torch.tensor([30.0], dtype=torch.float64), 300.0, 2.7, 0.1)[0]
    for (fx, fy), value in CTF_GOLDEN:
        row, col = int(round(fy * box * apix)) % box, int(round(fx * box * apix))
        assert float(ctf[row, col]) == pytest.approx(value, abs=2e-6)
    # at low frequency the CTF is +Q0-ish (positive density stays positive)
    assert float(ctf[0, 0]) == pytest.approx(0.1, abs=1e-6)
    assert conventions.electron_wavelength_A(300.0) == pytest.approx(0.0196876, abs=1e-6)


def test_projection_with_ctf_multiplies():
    box, apix = 16, 3.0
    g = _random_gmm(n=6, box=box, apix=apix)
    ky, kx = conventions.fourier_grid(box, apix)
    ctf = conventions.ctf_2d(ky, kx, torch.tensor([9000.0]), torch.tensor([9000.0]), torch.tensor([0.0]),
                             300.0, 2.7, 0.07)
    c, a, s = g.tensors()
    F0 = gmm.project(c, a, s, torch.eye(3)[None], box, apix)
    F1 = gmm.project(c, a, s, torch.eye(3)[None], box, apix, ctf=ctf)
    torch.testing.assert_close(F1, F0 * ctf)


def test_gmm_file_round_trip(tmp_path):
    g = _random_gmm(n=7)
    g.info.update(target_resolution_A=8.0, note="x")
    path = str(tmp_path / "gmm.npz")
    g.save(path)
    h = gmm.GMM.load(path)
    np.testing.assert_array_equal(h.centers_A, g.centers_A)
    np.testing.assert_array_equal(h.sigmas_A, g.sigmas_A)
    np.testing.assert_array_equal(h.amplitudes, g.amplitudes)
    assert (h.box, h.apix, len(h)) == (g.box, g.apix, 7)
    assert float(h.info["target_resolution_A"]) == 8.0
    assert not (tmp_path / "gmm.npz.tmp.npz").exists()


def test_gmm_rejects_mismatched_arrays():
    with pytest.raises(ValueError):
        gmm.GMM(np.zeros((3, 3)), np.ones(2), np.ones(3), 16, 1.0)


# ----------------------------------------------------------------------------- fourier.py
def test_fsc_identical_and_independent():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 32, 32)).astype(np.float32)
    b = rng.normal(size=(32, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(fourier.fsc(a, a), 1.0, atol=1e-6)
    np.testing.assert_allclose(fourier.fsc(a, 3.0 * a + 0.0), 1.0, atol=1e-6)
    ind = fourier.fsc(a, b)
    assert np.abs(ind[4:]).max() < 0.25  # shells of >= ~200 voxels: |FSC| ~ 1/sqrt(n)
    assert abs(ind[4:].mean()) < 0.05
    assert ind[0] == 1.0


def test_fsc_table_axes():
    t = fourier.fsc_table(np.ones((16, 16, 16)), np.ones((16, 16, 16)), 2.0)
    assert list(t) == ["shell", "freq_invA", "resolution_A", "fsc"]
    assert t["shell"][-1] == 8 and t["freq_invA"][8] == pytest.approx(8 / 32)
    assert t["resolution_A"][8] == pytest.approx(4.0) and np.isinf(t["resolution_A"][0])
    with pytest.raises(ValueError):
        fourier.fsc(np.ones((8, 8, 8)), np.ones((8, 8, 9)))


def test_resolution_at_threshold():
    freq = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    curve = np.array([1.0, 0.9, 0.7, 0.3, 0.1])
    # 0.5 is crossed half-way between 0.2 and 0.3 1/A -> 1/0.25 = 4 A
    assert fourier.resolution_at_threshold(freq, curve, 0.5) == pytest.approx(4.0)
    assert fourier.resolution_at_threshold(freq, curve, 0.143) == pytest.approx(1 / (0.3 + 0.157 / 0.2 * 0.1))
    assert fourier.resolution_at_threshold(freq, np.ones(5), 0.5) == pytest.approx(2.5)  # never: Nyquist


def test_shell_helpers():
    assert fourier.shell_for_resolution(64, 2.0, 8.0) == 16
    assert fourier.shell_for_resolution(64, 2.0, 1000.0) == 1
    np.testing.assert_allclose(fourier.shell_resolution_A(64, 2.0, np.array([16, 32])), [8.0, 4.0])
    idx = fourier.shell_index_2d(8)
    assert idx.shape == (8, 5) and int(idx[0, 0]) == 0 and int(idx[0, 4]) == 4 and int(idx[3, 3]) == 4


def test_ring_binner_frc():
    box, apix = 32, 2.0
    rng = np.random.default_rng(1)
    imgs = torch.as_tensor(rng.normal(size=(3, box, box)), dtype=torch.float32)
    F = conventions.image_to_fourier(imgs)
    rb = fourier.RingBinner(box, apix, lowres_A=40.0, highres_A=8.0)
    assert rb.lo == math.ceil(box * apix / 40.0) and rb.hi == 8
    torch.testing.assert_close(rb.mean_frc(F, 2.0 * F), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(rb.mean_frc(F, -F), -torch.ones(3), atol=1e-5, rtol=0)
    other = conventions.image_to_fourier(torch.as_tensor(rng.normal(size=(3, box, box)), dtype=torch.float32))
    assert float(rb.mean_frc(F, other).abs().max()) < 0.2
    # the ring sums equal an explicit loop over the ring indicator
    idx = fourier.shell_index_2d(box)
    p = (F.abs() ** 2)
    ref = torch.stack([p[:, idx == r].sum(1) for r in range(rb.lo, rb.hi + 1)], 1)
    torch.testing.assert_close(rb.ring_sums(rb.gather(p)), ref, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError):
        fourier.RingBinner(box, apix, lowres_A=8.0, highres_A=40.0)


def test_lowpass_map():
    rng = np.random.default_rng(2)
    vol = rng.normal(size=(32, 32, 32)).astype(np.float32)
    lp = fourier.lowpass_map(vol, 2.0, 8.0)
    curve = fourier.fsc(vol, lp)
    s = fourier.shell_for_resolution(32, 2.0, 8.0)  # 8
    assert curve[1:s - 1].min() > 0.999  # passband untouched
    P = np.abs(np.fft.rfftn(lp)) ** 2
    idx = fourier.shell_index_3d(32)
    assert P[idx >= s + 2].max() < 1e-8 * P.max()  # stopband removed


# --- mixed precision of the projection's matrix product (issue 14) --------------------------------

def _precision_case(n=300, box=32, apix=3.0, batch=16, amp_scale=1.0):
    g = _random_gmm(n=n, box=box, apix=apix, seed=3)
    c, a, s = g.tensors()
    rots = torch.as_tensor(np.stack([conventions.euler_to_matrix(10.0 * i, 7.0 * i, 3.0 * i)
                                     for i in range(batch)]), dtype=torch.float32)
    origins = torch.linspace(-3, 3, 2 * batch).reshape(batch, 2)
    return c, a * amp_scale, s, rots, box, apix, origins


@pytest.mark.parametrize("precision,tol_rel,tol_frc", [("bf16", 1e-2, 1e-3), ("fp16", 2e-3, 2e-4)])
def test_low_precision_projection_close_to_fp32(precision, tol_rel, tol_frc):
    c, a, s, R, box, apix, o = _precision_case()
    ref = gmm.project(c, a, s, R, box, apix, o)
    F = gmm.project(c, a, s, R, box, apix, o, precision=precision)
    assert F.dtype == torch.complex64
    rel = float((F - ref).abs().norm() / ref.abs().norm())
    assert 0 < rel < tol_rel  # low precision really used, and accurate
    noisy = ref + 0.3 * ref.abs().mean() * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    rb = fourier.RingBinner(box, apix, None, 2.5 * apix)
    d_frc = (rb.mean_frc(F, noisy) - rb.mean_frc(ref, noisy)).abs().max()
    assert float(d_frc) < tol_frc


def test_projection_under_bf16_autocast_follows_it_in_float32_geometry():
    """The bf16 autocast failure of the old projection ('Expected both inputs to be Half, Float or
    Double tensors but got BFloat16'): now a complex64 result within bf16 accuracy of fp32."""
    c, a, s, R, box, apix, o = _precision_case()
    ref = gmm.project(c, a, s, R, box, apix, o)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F = gmm.project(c, a, s, R, box, apix, o)
    assert F.dtype == torch.complex64
    assert float((F - ref).abs().norm() / ref.abs().norm()) < 1e-2


def test_fp16_projection_never_overflows_to_nan():
    """Amplitudes whose unscaled products exceed float16's 65504 stay finite (per-particle scaling)."""
    c, a, s, R, box, apix, o = _precision_case(amp_scale=1e6)
    assert float(gmm.projection_weights(a, s, apix).max()) > 65504
    ref = gmm.project(c, a, s, R, box, apix, o)
    F = gmm.project(c, a, s, R, box, apix, o, precision="fp16")
    assert bool(torch.isfinite(torch.view_as_real(F)).all())
    assert float((F - ref).abs().norm() / ref.abs().norm()) < 2e-3


def test_low_precision_gradients_close_to_fp32():
    c, a, s, R, box, apix, o = _precision_case(n=100, batch=4)
    grads = []
    for precision in ("fp32", "bf16"):
        leaf = c.clone().requires_grad_(True)
        gmm.project(leaf, a, s, R, box, apix, o, precision=precision).abs().sum().backward()
        grads.append(leaf.grad)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-2


def test_projection_precision_names():
    assert gmm.projection_precision("fp32", "cpu") is None
    assert gmm.projection_precision("bf16", "cpu") == torch.bfloat16
    assert gmm.projection_precision(None, "cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gmm.projection_precision(None, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="projection precision"):
        gmm.projection_precision("int8", "cpu")
