"""Per-patient anatomy and per-video motion of the echo phantom, and the per-frame heart geometry they imply.

Units: lengths in pixels of the rendered ``size`` × ``size`` frame, angles in degrees, times in seconds, EF in percent.
Sampling ranges are written for 112-px frames and scaled by ``size / 112``, so another size shows the same hearts.
Heart-local coordinates: ``s`` runs along the LV long axis from the apex towards the mitral annulus, ``q`` across it,
positive towards the LV lateral wall (image right); the RV and RA sit at negative ``q``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

EF_LIMITS = (12.0, 85.0)  # every video's target EF (%) is clipped to this span
CM_PER_PIXEL_AT_112 = 0.14  # cm/px of a 112-px phantom; it scales as 112 / size, so volumes do not depend on size


def cm_per_pixel(size: int) -> float:
    """Pixel spacing (cm/px) of a ``size``-px phantom frame: 0.14 cm/px at 112 px (a ~15 cm deep sector)."""
    return CM_PER_PIXEL_AT_112 * 112.0 / size


@dataclass(frozen=True)
class Device:
    """A scanner's visible habits: sector half-angle (deg) and radius (fraction of the frame size), depth ticks every
    ``tick_cm`` inside the right sector edge (0: none), speckle grain (``(axial, lateral)`` px at 112 px), gamma."""

    name: str
    half_angle_deg: float
    depth: float
    tick_cm: float
    grain: tuple[float, float]
    gamma: float


DEVICES = (
    Device("vivid", 42.0, 0.95, 1.0, (0.9, 1.6), 0.95),
    Device("epiq", 45.0, 0.98, 2.0, (0.7, 1.2), 1.05),
    Device("acuson", 40.0, 0.93, 0.0, (1.1, 2.0), 0.90),
    Device("sonos", 47.0, 0.97, 1.0, (0.8, 1.4), 1.00),
)
NEUTRAL_DEVICE = Device("neutral", 44.0, 0.96, 0.0, (0.9, 1.5), 1.0)  # every video's, with fingerprints off


@dataclass(frozen=True, eq=False)
class PatientAnatomy:
    """What stays fixed across one patient's videos. Lengths are end-diastolic, in px; levels are echogenicities in
    [0, 1]. ``texture`` (fine speckle, mean 1) and ``shading`` (coarse brightness, mean 1) are ``(2 * extent, 2 *
    extent)`` fields indexed by heart-local ``(s, q)`` with ``extent = texture_extent(size)`` at the centre."""

    patient: int
    size: int
    device: Device
    ef_baseline: float
    kappa: float  # longitudinal / radial shortening
    lv_length: float
    lv_diameter: float
    lv_equator: float  # where the LV is widest, as a fraction of its length
    axis_deg: float  # long-axis tilt from vertical; positive puts the base right of the apex
    apex_x: float
    apex_y: float
    rv_length: float
    rv_diameter: float
    la_length: float
    la_width: float
    ra_length: float
    ra_width: float
    wall: float
    atrial_wall: float
    wall_level: float
    blood_level: float
    background_level: float
    gain: float
    attenuation: float
    texture: np.ndarray = field(repr=False)
    shading: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class VideoMotion:
    """What changes per video: acquisition (fps, frames), heart rate (bpm), cardiac phase at frame 0 (cycles), the
    systolic fraction of the cycle, the target EF (%), the shortenings that realise it, and the probe jitter."""

    video: int
    fps: float
    num_frames: int
    heart_rate_bpm: float
    phase0: float
    systole_fraction: float
    target_ef: float
    radial_shortening: float
    longitudinal_shortening: float
    shift: tuple[float, float]
    rotation_deg: float


@dataclass(frozen=True, eq=False)
class HeartGeometry:
    """Per-frame chamber geometry in image px (x right, y down, pixel centres at integers). ``apex`` (2,) and the
    unit vectors ``u`` (apex → base) and ``v`` (towards the LV lateral wall) place the heart-local frame; every other
    array is ``(T,)``: ``contraction`` 0 at end-diastole … 1 at end-systole, chamber lengths along ``u``, widths
    along ``v``, ``rv_q`` the RV centre line, ``valve_open`` the AV valves' opening in [0, 1]."""

    apex: np.ndarray
    u: np.ndarray
    v: np.ndarray
    contraction: np.ndarray
    lv_length: np.ndarray
    lv_diameter: np.ndarray
    lv_equator: float
    wall: np.ndarray
    rv_apex: float
    rv_length: np.ndarray
    rv_diameter: np.ndarray
    rv_q: np.ndarray
    la_length: np.ndarray
    la_width: np.ndarray
    ra_length: np.ndarray
    ra_width: np.ndarray
    valve_open: np.ndarray

    def lv_half_width(self, s: np.ndarray, frame: int) -> np.ndarray:
        """LV half-width (px) at distance ``s`` (px) from the apex in ``frame``: a truncated ellipse, widest at
        ``lv_equator`` × length, cut flat at the annulus."""
        semi = self.lv_equator * self.lv_length[frame]
        inside = 1.0 - ((np.asarray(s, dtype=np.float64) - semi) / semi) ** 2
        return 0.5 * self.lv_diameter[frame] * np.sqrt(np.clip(inside, 0.0, None))


def texture_extent(size: int) -> int:
    """Half-size (px) of the patient texture: covers every sector pixel in heart-local coordinates."""
    return int(np.ceil(1.3 * size))


def smooth_complex_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    """Complex white Gaussian noise ``shape`` low-passed with a Gaussian of ``sigma`` px per axis (complex64); its
    magnitude is Rayleigh distributed, i.e. fully developed speckle."""
    noise = rng.standard_normal((*shape, 2), dtype=np.float32).view(np.complex64)[..., 0]
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * ((sigma[0] * fy) ** 2 + (sigma[1] * fx) ** 2)).astype(np.float32)
    return np.fft.ifft2(noise * transfer, norm="ortho").astype(np.complex64)


def baseline_ef(draw: float, ef_range: tuple[float, float] | None) -> float:
    """A patient's baseline EF (%) from its draw ~ normal(55, 12): that draw clipped to 15–80 (EchoNet-Dynamic's
    bulk, few under 30 %), or with ``ef_range`` (lo, hi) the same draw mapped through the normal CDF to uniform in
    [lo, hi], so a flag changes no other draw."""
    if ef_range is None:
        return float(np.clip(draw, 15.0, 80.0))
    quantile = 0.5 * (1.0 + math.erf((draw - 55.0) / (12.0 * math.sqrt(2.0))))
    return float(ef_range[0] + quantile * (ef_range[1] - ef_range[0]))


def sample_patient(
    rng: np.random.Generator, patient: int, size: int, device_fingerprint: bool = True,
    ef_range: tuple[float, float] | None = None,
) -> PatientAnatomy:
    """Draw one patient's anatomy (every draw happens whatever the flags, so flags never shift other draws)."""
    k = size / 112.0
    device = DEVICES[int(rng.integers(len(DEVICES)))]
    if not device_fingerprint:
        device = NEUTRAL_DEVICE
    scale = rng.uniform(0.86, 1.12)  # body size: the whole heart, so EDV spans ~60-190 mL with sane proportions
    lv_length = 61.0 * scale * rng.uniform(0.92, 1.08)
    lv_diameter = 34.0 * scale * rng.uniform(0.9, 1.1)
    extent = texture_extent(size)
    grain = (max(device.grain[0] * k, 0.5), max(device.grain[1] * k, 0.6))
    texture = np.abs(smooth_complex_noise(rng, (2 * extent, 2 * extent), grain))
    shading = smooth_complex_noise(rng, (2 * extent, 2 * extent), (5.0 * k, 5.0 * k)).real
    shading = 1.0 + 0.2 * shading / (shading.std() + 1e-6)
    return PatientAnatomy(
        patient=patient,
        size=size,
        device=device,
        ef_baseline=baseline_ef(float(rng.normal(55.0, 12.0)), ef_range),
        kappa=rng.uniform(0.42, 0.55),
        lv_length=lv_length * k,
        lv_diameter=lv_diameter * k,
        lv_equator=rng.uniform(0.66, 0.78),
        axis_deg=rng.uniform(4.0, 14.0),
        apex_x=(56.0 + rng.uniform(0.0, 5.0)) * k,
        apex_y=rng.uniform(9.0, 15.0) * k,
        rv_length=lv_length * rng.uniform(0.7, 0.82) * k,
        rv_diameter=lv_diameter * rng.uniform(0.6, 0.78) * k,
        la_length=lv_length * rng.uniform(0.55, 0.7) * k,
        la_width=lv_diameter * rng.uniform(0.8, 1.0) * k,
        ra_length=lv_length * rng.uniform(0.5, 0.65) * k,
        ra_width=lv_diameter * rng.uniform(0.72, 0.9) * k,
        wall=rng.uniform(6.0, 8.5) * k,
        atrial_wall=rng.uniform(2.0, 3.0) * k,
        wall_level=rng.uniform(0.55, 0.85),
        blood_level=rng.uniform(0.02, 0.05),
        background_level=rng.uniform(0.15, 0.3),
        gain=rng.uniform(0.8, 1.2),
        attenuation=rng.uniform(0.3, 0.9),
        texture=(texture / texture.mean()).astype(np.float32),
        shading=np.clip(shading, 0.55, 1.6).astype(np.float32),
    )


def contraction_curve(phase: np.ndarray, systole_fraction: float) -> np.ndarray:
    """LV contraction in [0, 1] at cardiac ``phase`` (cycles; 0 = end-diastole): a half-cosine systole up to 1 at
    ``systole_fraction``, then rapid early filling (3/4 of the volume), diastasis and the atrial kick (last 1/4)."""
    p = np.mod(phase, 1.0)
    x = (p - systole_fraction) / (1.0 - systole_fraction)
    systole = 0.5 - 0.5 * np.cos(np.pi * p / systole_fraction)
    diastole = 1.0 - 0.75 * _smoothstep(x / 0.35) - 0.25 * _smoothstep((x - 0.72) / 0.28)
    return np.where(p < systole_fraction, systole, diastole)


def _smoothstep(z: np.ndarray) -> np.ndarray:
    z = np.clip(z, 0.0, 1.0)
    return z * z * (3.0 - 2.0 * z)


def solve_shortening(ef_percent: float, kappa: float) -> float:
    """Radial shortening ``b`` with ``(1 - kappa b) (1 - b)^2 = 1 - EF/100``, the longitudinal one being ``kappa b``:
    disk volumes scale as length × diameter², so this ratio is exactly the geometry's ESV/EDV."""
    ratio = 1.0 - ef_percent / 100.0
    lo, hi = 0.0, 0.95
    for _ in range(60):  # the left side falls monotonically in b: bisection is exact enough and never fails
        mid = 0.5 * (lo + hi)
        if (1.0 - kappa * mid) * (1.0 - mid) ** 2 > ratio:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _shows_ed_and_es(phase0: float, period: float, systole: float, duration: float, margin: float) -> bool:
    """Whether an end-diastole and an end-systole both fall in ``[margin, duration - margin]`` seconds."""
    for event in (0.0, systole):
        first = (np.ceil(phase0 - event + margin / period) + event - phase0) * period  # first event time ≥ margin
        if first > duration - margin:
            return False
    return True


def sample_video(
    rng: np.random.Generator,
    anatomy: PatientAnatomy,
    video: int,
    fps_range: tuple[float, float],
    frames_range: tuple[int, int],
) -> VideoMotion:
    """Draw one video's motion: fps uniform in ``fps_range`` (rounded to 0.01), frame count uniform in
    ``frames_range``, 50–110 bpm (faster for clips too short to hold a systole at 50 bpm), a target EF near the
    patient's baseline, and a ±1.5 px / ±2° probe jitter.

    The cardiac phase at frame 0 is drawn among those that show both an end-diastole and an end-systole at least one
    frame inside the clip, so the traced ED/ES frames are true extremes (when the clip is long enough to allow it).
    """
    k = anatomy.size / 112.0
    fps = round(float(rng.uniform(*fps_range)), 2)
    num_frames = int(rng.integers(frames_range[0], frames_range[1] + 1))
    systole = rng.uniform(0.3, 0.38)
    duration, margin = (num_frames - 1) / fps, 1.0 / fps
    # Short clips: the slowest heart rate is raised (up to 110 bpm) until an ED → ES stretch fits inside the clip.
    slowest = 60.0 * systole / (duration - 2.0 * margin) if duration > 2.0 * margin else np.inf
    heart_rate = rng.uniform(min(max(50.0, slowest), 110.0), 110.0)
    target = float(np.clip(anatomy.ef_baseline + rng.normal(0.0, 3.0), *EF_LIMITS))
    radial = solve_shortening(target, anatomy.kappa)
    shift = (float(rng.uniform(-1.5, 1.5) * k), float(rng.uniform(-1.5, 1.5) * k))
    rotation = float(rng.uniform(-2.0, 2.0))
    period = 60.0 / heart_rate
    candidates = rng.uniform(size=32)
    valid = [c for c in candidates if _shows_ed_and_es(c, period, systole, duration, margin)]
    phase0 = float(valid[0]) if valid else float(np.mod(-margin / period, 1.0))  # else: ED at frame 1
    return VideoMotion(video, fps, num_frames, float(heart_rate), phase0, float(systole), target, radial,
                       anatomy.kappa * radial, shift, rotation)


def heart_geometry(anatomy: PatientAnatomy, motion: VideoMotion) -> HeartGeometry:
    """Per-frame geometry of ``motion`` applied to ``anatomy``, the jitter turning the heart about the LV's middle."""
    t = np.arange(motion.num_frames) / motion.fps
    phase = motion.phase0 + t * motion.heart_rate_bpm / 60.0
    c = contraction_curve(phase, motion.systole_fraction)
    x = (np.mod(phase, 1.0) - motion.systole_fraction) / (1.0 - motion.systole_fraction)
    valve_open = _smoothstep((x - 0.03) / 0.08) * _smoothstep((1.0 - x) / 0.06)

    axis, jitter = np.deg2rad(anatomy.axis_deg), np.deg2rad(motion.rotation_deg)
    u = np.array([np.sin(axis + jitter), np.cos(axis + jitter)])
    v = np.array([np.cos(axis + jitter), -np.sin(axis + jitter)])
    # Turn about the middle of the LV, not the sector apex: about the apex 2° would move the atria by ~4 px, and a
    # patient's videos would differ more by jitter than patients differ by anatomy.
    apex0 = np.array([anatomy.apex_x, anatomy.apex_y])
    pivot = apex0 + 0.5 * anatomy.lv_length * np.array([np.sin(axis), np.cos(axis)])
    rot = np.array([[np.cos(jitter), np.sin(jitter)], [-np.sin(jitter), np.cos(jitter)]])
    apex = pivot + rot @ (apex0 - pivot) + np.array(motion.shift)

    a, b = motion.longitudinal_shortening, motion.radial_shortening
    lv_length = anatomy.lv_length * (1.0 - a * c)
    lv_diameter = anatomy.lv_diameter * (1.0 - b * c)
    wall = anatomy.wall * (1.0 + 0.6 * b * c)  # myocardium thickens as the cavity empties
    b_rv = 0.6 * b + 0.08
    rv_length = anatomy.rv_length * (1.0 - 0.5 * b_rv * c)
    rv_diameter = anatomy.rv_diameter * (1.0 - b_rv * c)
    septum = 0.9 * wall
    atrial = 1.0 + 0.25 * (c - 0.5)  # atria fill while the ventricles empty
    return HeartGeometry(
        apex=apex, u=u, v=v, contraction=c,
        lv_length=lv_length, lv_diameter=lv_diameter, lv_equator=anatomy.lv_equator, wall=wall,
        rv_apex=0.95 * anatomy.lv_length - anatomy.rv_length,
        rv_length=rv_length, rv_diameter=rv_diameter, rv_q=-(0.5 * lv_diameter + septum + 0.5 * rv_diameter),
        la_length=anatomy.la_length * atrial, la_width=anatomy.la_width * atrial,
        ra_length=anatomy.ra_length * atrial, ra_width=anatomy.ra_width * atrial,
        valve_open=valve_open,
    )
