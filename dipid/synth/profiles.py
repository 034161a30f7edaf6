"""Pure maths of the simulator: peak profiles, rocking curves, extents and diffraction geometry.

Every profile is a Pearson VII function normalised to 1 at its centre and 1/2 at one half width
(``hwhm``)::

    p(q) = (1 + (2**(1/m) - 1) * q**2) ** -m,      q = distance / hwhm

``m = 1`` is a Lorentzian, ``m -> inf`` a Gaussian; small ``m`` gives the heavy tails of strong
Bragg peaks. The same family serves the rocking curve (q = 2 * (frame - centre) / fwhm).
"""

from __future__ import annotations

import math

import numpy as np

HC_KEV_ANGSTROM = 12.398419843320026  # h*c in keV*Å: wavelength (Å) = HC / energy (keV)


def pearson7(q2: np.ndarray | float, m: float) -> np.ndarray | float:
    """Pearson VII of a squared reduced distance ``q2`` (peak 1, half maximum at q2 = 1)."""
    k = 2.0 ** (1.0 / m) - 1.0
    if isinstance(q2, np.ndarray):
        return np.exp(np.float32(-m) * np.log1p(np.float32(k) * q2))
    return math.exp(-m * math.log1p(k * q2))


def pearson7_reach(ratio: float, m: float) -> float:
    """Reduced distance q at which a Pearson VII of peak ``ratio`` falls to 1 (0 if ratio <= 1)."""
    if ratio <= 1.0:
        return 0.0
    k = 2.0 ** (1.0 / m) - 1.0
    # ratio**(1/m) overflows for tiny m; work in logs.
    return math.sqrt(math.expm1(math.log(ratio) / m) / k)


def rocking_curve(frame_offset: np.ndarray | float, fwhm: float, m: float) -> np.ndarray | float:
    """Relative intensity (peak 1) ``frame_offset`` frames from the rocking maximum."""
    q = 2.0 * np.asarray(frame_offset, dtype=np.float64) / fwhm
    out = np.exp(-m * np.log1p((2.0 ** (1.0 / m) - 1.0) * q * q))
    return float(out) if np.ndim(out) == 0 else out


def rocking_reach(ratio: float, fwhm: float, m: float) -> float:
    """Frames from the maximum at which a rocking curve of peak ``ratio`` falls to 1."""
    return 0.5 * fwhm * pearson7_reach(ratio, m)


def ellipse_half_extent(a: float, b: float, angle_rad: float) -> tuple[float, float]:
    """(row, col) half sizes of the box around an ellipse with semi-axes a (along angle) and b."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return math.hypot(a * s, b * c), math.hypot(a * c, b * s)


def rectangle_half_extent(a: float, b: float, angle_rad: float) -> tuple[float, float]:
    """(row, col) half sizes of the box around a rectangle of half sizes a (along angle) and b."""
    c, s = abs(math.cos(angle_rad)), abs(math.sin(angle_rad))
    return a * s + b * c, a * c + b * s


def component_image(
    rows: np.ndarray,
    cols: np.ndarray,
    *,
    amplitude: float,
    hwhm_major: float,
    hwhm_minor: float,
    angle_rad: float,
    exponent: float,
    minor_exponent: float | None,
    bend: float,
) -> np.ndarray:
    """One peak component on a grid of offsets from its centre.

    Args:
        rows, cols: float32 (h, 1) and (1, w) pixel-centre offsets from the component centre, px.
        amplitude: value at the centre, counts.
        hwhm_major, hwhm_minor: half widths along and across ``angle_rad`` (from +col toward +row), px.
        exponent: Pearson VII exponent (radial, or along the major axis when separable).
        minor_exponent: None for an elliptical radial profile; else the profile is separable
            (a rod: slow decay along, ``minor_exponent`` across).
        bend: curvature px⁻¹; the minor coordinate is shifted by ``bend * u**2`` (banana shapes).
    Returns:
        (h, w) float32 counts.
    """
    c, s = np.float32(math.cos(angle_rad)), np.float32(math.sin(angle_rad))
    u = cols * c + rows * s
    v = rows * c - cols * s
    if bend:
        v = v - np.float32(bend) * u * u
    u = u * np.float32(1.0 / hwhm_major)
    v = v * np.float32(1.0 / hwhm_minor)
    if minor_exponent is None:
        out = pearson7(u * u + v * v, exponent)
    else:
        out = pearson7(u * u, exponent) * pearson7(v * v, minor_exponent)
    return out * np.float32(amplitude)


def bragg_two_theta(q_inv_angstrom: float, energy_kev: float) -> float:
    """Scattering angle 2θ (radians) of momentum transfer q (Å⁻¹) at a photon energy (keV)."""
    wavelength = HC_KEV_ANGSTROM / energy_kev
    sin_theta = q_inv_angstrom * wavelength / (4.0 * math.pi)
    if not 0.0 < sin_theta < 1.0:
        raise ValueError(f"q = {q_inv_angstrom} Å⁻¹ is not reachable at {energy_kev} keV")
    return 2.0 * math.asin(sin_theta)


def ring_radius_px(q_inv_angstrom: float, *, energy_kev: float, camera_length_mm: float, pixel_size_mm: float) -> float:
    """Radius (px) of the powder/solvent ring at q on a flat detector normal to the beam:
    ``camera_length * tan(2θ) / pixel_size``. Raises ValueError where 2θ is 90° or more."""
    two_theta = bragg_two_theta(q_inv_angstrom, energy_kev)
    if two_theta >= 0.5 * math.pi:
        raise ValueError(f"q = {q_inv_angstrom} Å⁻¹ scatters past 90° at {energy_kev} keV; no ring on a flat detector")
    return camera_length_mm * math.tan(two_theta) / pixel_size_mm


def q_of_radius(
    radius_px: np.ndarray, *, energy_kev: float, camera_length_mm: float, pixel_size_mm: float
) -> np.ndarray:
    """Momentum transfer (Å⁻¹) of pixels ``radius_px`` from the beam centre (inverse of :func:`ring_radius_px`)."""
    two_theta = np.arctan(radius_px * np.float32(pixel_size_mm / camera_length_mm))
    wavelength = HC_KEV_ANGSTROM / energy_kev
    return (np.float32(4.0 * math.pi / wavelength) * np.sin(two_theta * np.float32(0.5))).astype(np.float32)
