"""Golden-value tests of the one conventions module (RELION Euler ZYZ, origin sign, CTF)."""
import math

import numpy as np
import pytest
import torch

from scipion_gmmhet.engine import conventions as cv


def test_euler_matrix_golden_rot_only():
    # RELION's Euler_angles2matrix(-20, 0, 0): in-plane rotation with A(0,1) = sin(rot).
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    expected = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    np.testing.assert_allclose(cv.euler_to_matrix(-20.0, 0.0, 0.0), expected, atol=1e-12)


def test_euler_matrix_golden_side_view():
    # rot=90, tilt=90, psi=0: the projection direction (third row) is +y.
    expected = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)
    np.testing.assert_allclose(cv.euler_to_matrix(90.0, 90.0, 0.0), expected, atol=1e-12)


def test_euler_matrix_is_rz_ry_rz():
    def rz(a):
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(b):
        c, s = math.cos(math.radians(b)), math.sin(math.radians(b))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    rot, tilt, psi = 33.0, 71.0, -122.0
    np.testing.assert_allclose(cv.euler_to_matrix(rot, tilt, psi), rz(psi) @ ry(tilt) @ rz(rot), atol=1e-12)


def test_euler_round_trip_including_poles():
    rng = np.random.default_rng(1)
    n = 200
    rot, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    tilt = rng.uniform(0, 180, n)
    tilt[:10], tilt[10:20] = 0.0, 180.0
    A = cv.euler_to_matrix(rot, tilt, psi)
    back = cv.euler_to_matrix(*cv.matrix_to_euler(A))
    np.testing.assert_allclose(back, A, atol=1e-9)
    assert np.all(np.abs(np.linalg.det(A) - 1) < 1e-12)


def test_euler_numpy_and_torch_agree():
    rng = np.random.default_rng(2)
    e = rng.uniform(-180, 180, (3, 17))
    a = cv.euler_to_matrix(*e)
    t = cv.euler_to_matrix(*(torch.tensor(v) for v in e))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), a, atol=1e-12)


def test_angular_distance():
    A = cv.euler_to_matrix(10.0, 20.0, 30.0)
    B = cv.euler_to_matrix(10.0, 20.0, 33.5)
    assert cv.angular_distance_deg(A, B) == pytest.approx(3.5, abs=1e-6)


def test_angular_distance_exact_at_zero_and_accurate_everywhere():
    """Identical poses are 0 exactly (arccos of the trace gave ~1e-6 deg, which counted as moved);
    tiny and near-180 degree turns are accurate."""
    rng = np.random.default_rng(0)
    A = np.stack([cv.euler_to_matrix(*e) for e in rng.uniform(-180, 180, (200, 3))])
    assert (cv.angular_distance_deg(A, A.copy()) == 0).all()
    for angle in (1e-5, 0.01, 90.0, 179.99):
        B = cv.euler_to_matrix(10.0, 20.0, 30.0 + angle)
        assert cv.angular_distance_deg(A[0:1] * 0 + cv.euler_to_matrix(10.0, 20.0, 30.0), B)[0] == \
            pytest.approx(angle, rel=1e-6)


def test_wavelength_golden():
    assert float(cv.electron_wavelength_A(300.0)) == pytest.approx(0.019687, abs=2e-6)
    assert float(cv.electron_wavelength_A(200.0)) == pytest.approx(0.025079, abs=2e-6)


def _relion_ctf_scalar(kx, ky, du, dv, ang, kv, cs, q0, phase=0.0):
    """RELION's CTF::getCTF written out with scalars, independently of conventions.ctf_2d."""
    v = kv * 1e3
    lam = 12.2643247 / math.sqrt(v * (1 + v * 0.978466e-6))
    u2 = kx * kx + ky * ky
    defocus_average = -(du + dv) * 0.5
    defocus_deviation = -(du - dv) * 0.5
    ellipsoid_ang = math.atan2(ky, kx) - math.radians(ang)
    deltaf = defocus_average + defocus_deviation * math.cos(2 * ellipsoid_ang)
    K1 = math.pi / 2 * 2 * lam
    K2 = math.pi / 2 * cs * 1e7 * lam ** 3
    K3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    K5 = math.radians(phase)
    gamma = K1 * deltaf * u2 + K2 * u2 * u2 - K5 - K3
    return -math.sin(gamma)


@pytest.mark.parametrize("phase", [0.0, 35.0])
def test_ctf_matches_relion_formula(phase):
    box, apix = 64, 1.3
    ky, kx = cv.fourier_grid(box, apix, dtype=torch.float64)
    params = dict(du=15000.0, dv=14200.0, ang=37.0, kv=300.0, cs=2.7, q0=0.1)
    ctf = cv.ctf_2d(ky, kx, params["du"], params["dv"], params["ang"], params["kv"], params["cs"], params["q0"],
                    phase_shift_deg=phase)
    assert ctf.shape == (1, box, box // 2 + 1)
    for iy, ix in [(0, 1), (3, 5), (60, 17), (20, 32), (33, 0)]:
        expected = _relion_ctf_scalar(float(kx[0, ix]), float(ky[iy, 0]), **params, phase=phase)
        assert float(ctf[0, iy, ix]) == pytest.approx(expected, abs=1e-9)
    # Zero frequency: CTF = sin(K3 + phase shift), about +amplitude contrast without a phase plate
    # (positive-density particles stay positive).
    assert float(ctf[0, 0, 0]) == pytest.approx(math.sin(math.atan(0.1 / math.sqrt(0.99)) + math.radians(phase)),
                                                abs=1e-9)


def test_origin_shift_sign():
    """rlnOrigin is the shift that centres the particle: the particle sits at -origin."""
    box, apix = 32, 2.0
    centred = torch.zeros(1, box, box, dtype=torch.float64)
    centred[0, box // 2, box // 2] = 1.0
    ky, kx = cv.fourier_grid(box, apix, dtype=torch.float64)
    origin_x_A, origin_y_A = 3 * apix, -5 * apix
    F = cv.image_to_fourier(centred) * cv.origin_phase(ky, kx, torch.tensor([origin_x_A]), torch.tensor([origin_y_A]))
    raw = cv.fourier_to_image(F, box)[0]
    iy, ix = np.unravel_index(int(torch.argmax(raw)), raw.shape)
    assert (ix - box // 2, iy - box // 2) == (-3, 5)
    assert float(raw.max()) == pytest.approx(1.0, abs=1e-9)


def test_fourier_round_trip_and_centre():
    img = torch.randn(2, 33, 33, dtype=torch.float64)
    np.testing.assert_allclose(cv.fourier_to_image(cv.image_to_fourier(img), 33).numpy(), img.numpy(), atol=1e-12)
    delta = torch.zeros(1, 33, 33, dtype=torch.float64)
    delta[0, 16, 16] = 1.0  # the centre pixel D//2 transforms to a flat, real spectrum
    F = cv.image_to_fourier(delta)
    np.testing.assert_allclose(F.real.numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(F.imag.numpy(), 0.0, atol=1e-12)
