"""Rendering phantom frames: chamber fields → echogenicity → speckle, attenuation, sector → uint8 (pure numpy).

Every shape is an approximate signed distance field (px, negative inside) evaluated on the whole clip at once as
``(T, H, W)`` float32 arrays; masks ramp linearly over about a pixel, which antialiases every edge.
"""

from __future__ import annotations

import numpy as np

from datamodules.phantom.anatomy import (
    Device,
    HeartGeometry,
    PatientAnatomy,
    VideoMotion,
    cm_per_pixel,
    smooth_complex_noise,
    texture_extent,
)

_EDGE_PX = 1.0  # width of the antialiasing ramp
_LEAFLET_LEVEL = 0.9


def _soft(distance: np.ndarray, width: float = _EDGE_PX) -> np.ndarray:
    """Inside-ness in [0, 1] of a signed distance (negative inside), ramping over ``width`` px."""
    return np.clip(0.5 - distance / width, 0.0, 1.0)


def _col(values: np.ndarray) -> np.ndarray:
    """Per-frame values ``(T,)`` as ``(T, 1, 1)`` float32 to broadcast against frames."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _ellipse(s, q, s0, q0, half_s, half_q) -> np.ndarray:
    """Signed distance (px) to an ellipse centred at ``(s0, q0)``; exact on its axes, close to the rim elsewhere."""
    ds, dq = (s - s0) / half_s, (q - q0) / half_q
    r = np.sqrt(ds * ds + dq * dq) + 1e-6
    gradient = np.sqrt((ds / half_s) ** 2 + (dq / half_q) ** 2) + 1e-6
    return (r - 1.0) * r / gradient


def _segment(s, q, s0, q0, s1, q1) -> np.ndarray:
    """Distance (px) to the segment ``(s0, q0)``–``(s1, q1)``."""
    ds, dq = s1 - s0, q1 - q0
    t = np.clip(((s - s0) * ds + (q - q0) * dq) / (ds * ds + dq * dq + 1e-6), 0.0, 1.0)
    return np.sqrt((s - s0 - t * ds) ** 2 + (q - q0 - t * dq) ** 2)


def _window(geo: HeartGeometry, s_ends: np.ndarray, q_ends: np.ndarray, margin: float, size: int):
    """Image slices ``(rows, cols)`` holding the heart-local box ``s_ends`` × ``q_ends`` (any arrays; their extremes
    count) grown by ``margin`` px."""
    corners = [geo.apex + a * geo.u + b * geo.v for a in (np.min(s_ends), np.max(s_ends))
               for b in (np.min(q_ends), np.max(q_ends))]
    lo = np.floor(np.min(corners, axis=0) - margin).astype(int).clip(0, size)
    hi = np.ceil(np.max(corners, axis=0) + margin + 1.0).astype(int).clip(0, size)
    return slice(lo[1], hi[1]), slice(lo[0], hi[0])


def _valve(s, q, hinge_s, centre_q, half_width, opening) -> np.ndarray:
    """Distance (px) to two leaflets hinged at ``(hinge_s, centre_q ± half_width)``: closed they meet mid-annulus,
    open they swing towards the apex along the walls."""
    tip_s = hinge_s - half_width * (0.1 + 0.7 * opening)
    tip_off = half_width * (0.05 + 0.7 * opening)
    left = _segment(s, q, hinge_s, centre_q - half_width, tip_s, centre_q - tip_off)
    right = _segment(s, q, hinge_s, centre_q + half_width, tip_s, centre_q + tip_off)
    return np.minimum(left, right)


def _heart_fields(s: np.ndarray, q: np.ndarray, geo: HeartGeometry, anatomy: PatientAnatomy):
    """Blood, myocardium and valve distance fields ``(T, H, W)`` (px, negative inside) of the four chambers.

    Each chamber is evaluated only in a window around it (elsewhere the fields read ~1e3): the windows are a quarter
    of the frame or less, and this is where most of the rendering time goes.
    """
    size, frames = s.shape[-1], len(geo.lv_length)
    margin = float(np.max(geo.wall)) + 10.0 * size / 112.0  # beyond it the pericardial rim has faded to nothing
    blood, tissue, valves = (np.full((frames, size, size), 1e3, dtype=np.float32) for _ in range(3))
    wall, atrial = _col(geo.wall), np.float32(anatomy.atrial_wall)
    lv_len, lv_diam = _col(geo.lv_length), _col(geo.lv_diameter)
    rv_len, rv_diam, rv_q = _col(geo.rv_length), _col(geo.rv_diameter), _col(geo.rv_q)
    la_len, la_w = _col(geo.la_length), _col(geo.la_width)
    ra_len, ra_w = _col(geo.ra_length), _col(geo.ra_width)
    rv_base = np.float32(geo.rv_apex) + rv_len
    la_s, la_q = lv_len + 0.5 * la_len - 1.0, 0.1 * lv_diam
    ra_s, ra_q = rv_base + 0.5 * ra_len - 1.0, rv_q - 0.05 * rv_diam

    def lv(sw, qw):
        semi = geo.lv_equator * lv_len
        return np.maximum(_ellipse(sw, qw, semi, 0.0, semi, 0.5 * lv_diam), sw - lv_len)

    def rv(sw, qw):
        rs = sw - np.float32(geo.rv_apex)
        return np.maximum(_ellipse(rs, qw, 0.75 * rv_len, rv_q, 0.75 * rv_len, 0.5 * rv_diam), rs - rv_len)

    chambers = [  # (distance, wall thickness, heart-local box)
        (lv, wall, (0.0, lv_len), (-0.5 * lv_diam, 0.5 * lv_diam)),
        (rv, 0.8 * wall, (geo.rv_apex, rv_base), (rv_q - 0.5 * rv_diam, rv_q + 0.5 * rv_diam)),
        (lambda sw, qw: _ellipse(sw, qw, la_s, la_q, 0.5 * la_len, 0.5 * la_w), atrial,
         (la_s - 0.5 * la_len, la_s + 0.5 * la_len), (la_q - 0.5 * la_w, la_q + 0.5 * la_w)),
        (lambda sw, qw: _ellipse(sw, qw, ra_s, ra_q, 0.5 * ra_len, 0.5 * ra_w), atrial,
         (ra_s - 0.5 * ra_len, ra_s + 0.5 * ra_len), (ra_q - 0.5 * ra_w, ra_q + 0.5 * ra_w)),
    ]
    for distance_fn, thickness, s_box, q_box in chambers:
        rows, cols = _window(geo, np.concatenate([np.ravel(e) for e in s_box]),
                             np.concatenate([np.ravel(e) for e in q_box]), margin, size)
        distance = distance_fn(s[rows, cols], q[rows, cols])
        np.minimum(blood[:, rows, cols], distance, out=blood[:, rows, cols])
        np.minimum(tissue[:, rows, cols], distance - thickness, out=tissue[:, rows, cols])

    opening = _col(geo.valve_open)
    base_half = 0.46 * lv_diam * np.float32(np.sqrt(1.0 - ((1.0 - geo.lv_equator) / geo.lv_equator) ** 2))
    for hinge_s, centre_q, half_width in ((lv_len, np.float32(0.0), base_half), (rv_base, rv_q, 0.4 * rv_diam)):
        rows, cols = _window(geo, np.concatenate([np.ravel(hinge_s), np.ravel(hinge_s - 0.8 * half_width)]),
                             np.concatenate([np.ravel(centre_q - half_width), np.ravel(centre_q + half_width)]),
                             3.0, size)
        distance = _valve(s[rows, cols], q[rows, cols], hinge_s, centre_q, half_width, opening)
        np.minimum(valves[:, rows, cols], distance, out=valves[:, rows, cols])
    return blood, tissue, valves


def _bilinear(field: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``field`` at fractional ``(rows, cols)`` (clamped to its border)."""
    r = np.clip(rows, 0.0, field.shape[0] - 1.001)
    c = np.clip(cols, 0.0, field.shape[1] - 1.001)
    r0, c0 = r.astype(np.int64), c.astype(np.int64)
    fr, fc = (r - r0).astype(np.float32), (c - c0).astype(np.float32)
    top = field[r0, c0] * (1 - fc) + field[r0, c0 + 1] * fc
    bottom = field[r0 + 1, c0] * (1 - fc) + field[r0 + 1, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def speckle(rng: np.random.Generator, shape: tuple[int, int, int], grain: tuple[float, float]) -> np.ndarray:
    """Fully developed speckle ``(T, H, W)`` float32 with mean ~1: the magnitude (Rayleigh) of complex white noise
    low-passed to a correlation of ``grain`` px (axial = rows, lateral = columns)."""
    frames, height, width = shape
    field = np.abs(smooth_complex_noise(rng, (2 * height, 2 * width), grain))
    field /= field.mean()
    # Frames are random windows of one field twice the frame size: as decorrelated to the eye as fresh noise per
    # frame, at a fraction of the cost of filtering T fields.
    offsets = rng.integers(0, (height, width), size=(frames, 2))
    return np.stack([field[r : r + height, c : c + width] for r, c in offsets])


def sector_fields(size: int, device: Device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mask, radius, angle)`` of the imaging sector, each ``(H, W)``: soft mask in [0, 1], depth from the sector
    apex (px), and beam angle (rad, 0 straight down)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - np.float32((size - 1) / 2.0), y + np.float32(0.5)  # apex: top centre, half a pixel above row 0
    radius = np.sqrt(dx * dx + dy * dy)
    angle = np.arctan2(dx, dy)
    half = np.deg2rad(device.half_angle_deg)
    edge = np.maximum(radius - device.depth * size, (np.abs(angle) - half) * radius)
    return _soft(edge), radius, angle


def _tick_marks(size: int, device: Device, radius: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Soft dots ``(H, W)`` every ``device.tick_cm`` of depth, just inside the right sector edge."""
    if device.tick_cm <= 0:
        return np.zeros_like(radius)
    step = device.tick_cm / cm_per_pixel(size)
    edge_angle = np.deg2rad(device.half_angle_deg) - 1.5 / np.maximum(radius, 1.0)
    along = np.abs(radius - step * np.round(radius / step))
    across = np.abs(angle - edge_angle) * radius
    dots = _soft(np.sqrt(along**2 + across**2) - 0.7 * size / 112.0)
    return dots * (radius > step * 0.5) * (radius < device.depth * size - 1.0)


def render_video(
    anatomy: PatientAnatomy, motion: VideoMotion, geo: HeartGeometry, rng: np.random.Generator
) -> np.ndarray:
    """Render a clip as uint8 ``(T, size, size)``: black outside the sector, an apical-four-chamber heart inside.

    Brightness = echogenicity (dark blood, bright myocardium and valves, grey surroundings, a bright pericardial rim)
    × speckle (the patient's fixed tissue texture, moving with the heart, mixed with fresh per-frame speckle)
    × depth attenuation, lateral fall-off and gain, then the device's display gamma.
    """
    size, device = anatomy.size, anatomy.device
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    rel_x, rel_y = x - np.float32(geo.apex[0]), y - np.float32(geo.apex[1])
    s = (rel_x * geo.u[0] + rel_y * geo.u[1]).astype(np.float32)
    q = (rel_x * geo.v[0] + rel_y * geo.v[1]).astype(np.float32)
    blood, tissue, valves = _heart_fields(s, q, geo, anatomy)

    extent = texture_extent(size)
    texture = _bilinear(anatomy.texture, s + extent, q + extent)
    shading = _bilinear(anatomy.shading, s + extent, q + extent)
    mask, radius, angle = sector_fields(size, device)

    rim = 0.25 * np.exp(-(((tissue - 2.0) / 1.5) ** 2))  # pericardium just outside the myocardium
    # Tissue around the heart varies more than myocardium: a patient's coarse pattern there is a strong identity cue
    # that leaves the myocardium (and so the LV border) evenly bright.
    surroundings = anatomy.background_level * np.clip(1.0 + 2.5 * (shading - 1.0), 0.2, 2.5)
    echo = surroundings + rim
    echo = echo + (anatomy.wall_level * shading - echo) * _soft(tissue, 2.0)
    echo = echo + (anatomy.blood_level - echo) * _soft(blood, 1.6)
    echo = np.maximum(echo, _LEAFLET_LEVEL * _soft(valves - 0.45 * size / 112.0))
    haze = 0.35 * np.exp(-radius / (0.07 * size))  # near-field clutter under the probe

    grain = (device.grain[0] * size / 112.0, device.grain[1] * size / 112.0)
    fresh = speckle(rng, (motion.num_frames, size, size), grain)
    echo = (echo + haze) * (0.55 * texture + 0.45 * fresh)

    depth = radius / (device.depth * size)
    lateral = np.clip(1.0 - 0.35 * (np.abs(angle) / np.deg2rad(device.half_angle_deg)) ** 4, 0.0, 1.0)
    gain = anatomy.gain * np.exp(-anatomy.attenuation * depth) * (1.0 + 0.3 * depth) * lateral
    # Soft knee instead of clipping: bright speckle in strong walls saturates gradually, as log compression does.
    image = (1.0 - np.exp(-1.4 * echo * gain)) ** device.gamma * mask
    image = np.maximum(image, 0.8 * _tick_marks(size, device, radius, angle) * mask)
    return np.round(image * 255.0).astype(np.uint8)
