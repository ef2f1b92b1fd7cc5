"""Synthetic identities: a fixed random "face" per identity, rendered under random pose, light and clutter.

An identity is a parametric head drawn once from `rng(seed, identity)`: skin and hair colours, head shape,
eye/brow/mouth geometry, a few identity-specific marks, a striped texture patch and a low-frequency colour
field, plus a "usual" backdrop colour. Every image of it then varies in backdrop (partly the usual colour),
pose (rotation, scale, squeeze, shift), illumination (gain, gamma, colour cast, gradient), blur, sensor
noise and occluding rectangles, strongly enough that raw-pixel cosine is a poor verification signal
(about 59-64% 10-fold accuracy) while a small CNN still learns the identity.
Rendering is deterministic: equal (seed, identity, stream, count, size) give equal pixels. Random streams
are `default_rng([seed, 0, identity, part])`; other users of `seed` must pick a second word other than 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

TEMPLATE_MARGIN = 1.4  # templates cover [-1.4, 1.4]^2 of face coordinates; an unposed image shows [-1, 1]^2


@dataclass(frozen=True)
class Nuisance:
    """How strongly images of one identity differ; defaults give ~55-70% raw-pixel verification accuracy."""

    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.88, 1.12)
    squeeze_range: tuple[float, float] = (0.82, 1.02)  # horizontal squeeze, a cheap stand-in for yaw
    max_shift: float = 0.1  # in units of the half image size
    gain_range: tuple[float, float] = (0.55, 1.35)
    gamma_range: tuple[float, float] = (0.7, 1.45)
    color_cast: float = 0.18
    max_gradient: float = 0.45
    blur_probability: float = 0.5
    max_downscale: float = 3.0  # blurred images are rendered at 1/1.3 .. 1/max_downscale resolution
    max_noise_sigma: float = 14.0
    occlusion_probability: float = 0.35
    occlusion_size: tuple[float, float] = (0.15, 0.5)
    background_ramp: float = 40.0  # per-image background: colour ramp and colour wave amplitudes
    background_wave: float = 30.0
    background_tint: float = 30.0  # per-image backdrop colour: a grey level plus a tint of this size ...
    background_share: float = 0.3  # ... mixed with the identity's usual backdrop colour at this weight


DEFAULT_NUISANCE = Nuisance()


def _soft_ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float,
                  angle: float = 0.0, edge: float = 0.08) -> np.ndarray:
    """1 inside the (rotated) ellipse, 0 outside, with a soft rim of relative width `edge`."""
    cos, sin = np.cos(angle), np.sin(angle)
    du, dv = u - cx, v - cy
    a, b = (du * cos + dv * sin) / rx, (dv * cos - du * sin) / ry
    return np.clip((1.0 - np.sqrt(a * a + b * b)) / edge, 0.0, 1.0)


def _paint(image: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    """Blend `color` into `image` where `mask` (HxW in [0,1]) is set, in place."""
    image += mask[..., None] * (color - image)


def _paint_ellipse(image: np.ndarray, coords: np.ndarray, color: np.ndarray, cx: float, cy: float, rx: float,
                   ry: float, angle: float = 0.0, edge: float = 0.08, opacity: float = 1.0) -> None:
    """Blend a soft ellipse of `color` into `image`, touching only the ellipse's bounding box (fast)."""
    reach = max(rx, ry)
    rows = slice(*np.searchsorted(coords, [cy - reach, cy + reach]))
    cols = slice(*np.searchsorted(coords, [cx - reach, cx + reach]))
    v, u = np.meshgrid(coords[rows], coords[cols], indexing="ij")
    mask = _soft_ellipse(u, v, cx, cy, rx, ry, angle, edge)
    if opacity != 1.0:
        mask *= opacity
    _paint(image[rows, cols], mask, color)


def identity_template(seed: int, identity: int, image_size: int) -> np.ndarray:
    """The identity's canonical head as HxWx4 float32 RGBA in [0,255] (alpha 0 = backdrop), covering
    TEMPLATE_MARGIN times the image; backdrops are drawn per image by `render_identity`."""
    rng = np.random.default_rng([seed, 0, identity, 0])
    size = round(image_size * TEMPLATE_MARGIN)
    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0) * TEMPLATE_MARGIN
    v, u = np.meshgrid(coords, coords, indexing="ij")
    image = np.zeros((size, size, 3), np.float32)
    cx, cy = rng.normal(0.0, 0.04), rng.normal(0.05, 0.04)
    rx, ry = rng.uniform(0.5, 0.7), rng.uniform(0.7, 0.9)
    skin = np.array([rng.uniform(120, 240), 0, 0], np.float32)
    skin[1], skin[2] = skin[0] * rng.uniform(0.6, 0.85), skin[0] * rng.uniform(0.45, 0.75)
    hair_line = cy - ry * rng.uniform(0.3, 0.7) + 0.07 * np.sin(u * rng.uniform(3, 9) + rng.uniform(0, 6.3))
    hair = _soft_ellipse(u, v, cx, cy - 0.04, rx * 1.08, ry * 1.05) * np.clip((hair_line - v) / 0.05, 0, 1)
    _paint(image, hair, rng.uniform(10, 200) * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.4, 1.0)],
                                                        np.float32))
    head = _soft_ellipse(u, v, cx, cy, rx, ry)
    face = head * (1.0 - hair)
    shading = (1.0 - 0.3 * ((u - cx) / rx) ** 2)[..., None]
    image += face[..., None] * (skin * shading - image)
    for _ in range(3):  # low-frequency colour field: skin tone blotches and hair highlights
        freq = rng.normal(0.0, 1.6, 2)
        wave = np.cos(2 * np.pi * (freq[0] * u + freq[1] * v) + rng.uniform(0, 2 * np.pi))
        image += wave[..., None] * rng.uniform(-20, 20, 3).astype(np.float32)
    eye_dx, eye_dy, eye_r = rng.uniform(0.2, 0.34), rng.uniform(-0.22, -0.05), rng.uniform(0.06, 0.11)
    iris = rng.uniform(10, 160, 3).astype(np.float32)
    brow_lift, brow_tilt = rng.uniform(0.1, 0.22), rng.uniform(-0.35, 0.35)
    brow_color = rng.uniform(10, 120, 3).astype(np.float32)
    for side in (-1.0, 1.0):
        ex, ey = cx + side * eye_dx, cy + eye_dy
        _paint_ellipse(image, coords, np.float32([235] * 3), ex, ey, eye_r * 1.5, eye_r * 0.8, edge=0.2)
        _paint_ellipse(image, coords, iris, ex, ey, eye_r * 0.65, eye_r * 0.65, edge=0.25)
        _paint_ellipse(image, coords, brow_color, ex, ey - brow_lift, eye_r * 1.8, 0.025 + eye_r * 0.25,
                       angle=side * brow_tilt, edge=0.3)
    nose_len = rng.uniform(0.15, 0.32)
    _paint_ellipse(image, coords, skin * 0.6, cx, cy + eye_dy + nose_len, 0.07, nose_len * 0.6, edge=0.5,
                   opacity=0.5)
    mouth_y = cy + eye_dy + nose_len + rng.uniform(0.15, 0.3)
    mouth_x, mouth_w, mouth_h = cx + rng.normal(0, 0.03), rng.uniform(0.12, 0.3), rng.uniform(0.03, 0.08)
    mouth_angle = rng.normal(0, 0.1)
    lips = np.float32([rng.uniform(110, 220), rng.uniform(30, 90), rng.uniform(40, 100)])
    _paint_ellipse(image, coords, lips, mouth_x, mouth_y, mouth_w, mouth_h, angle=mouth_angle, edge=0.3)
    for _ in range(rng.integers(3, 7)):  # identity marks: moles, scars, glasses pads, tattoos...
        mx, my = cx + rng.uniform(-0.8, 0.8) * rx, cy + rng.uniform(-0.8, 0.8) * ry
        radius = rng.uniform(0.03, 0.11)
        minor, angle = radius * rng.uniform(0.4, 1.0), rng.uniform(0, np.pi)
        _paint_ellipse(image, coords, rng.uniform(0, 255, 3).astype(np.float32), mx, my, radius, minor,
                       angle=angle, edge=0.4)
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.16)  # striped texture patch
    px, py = cx + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(-0.5, 0.5) * ry
    stripes = np.cos(2 * np.pi * ((u - px) * np.cos(angle) + (v - py) * np.sin(angle)) / period)
    window = np.exp(-((u - px) ** 2 + (v - py) ** 2) / (2 * rng.uniform(0.1, 0.2) ** 2))
    image += (stripes * window)[..., None] * rng.uniform(-45, 45, 3).astype(np.float32)
    alpha = 255.0 * np.maximum(head, hair)[..., None]
    return np.concatenate([np.clip(image, 0, 255, out=image), alpha], axis=2)


@lru_cache(maxsize=4)
def _noise_bank(image_size: int) -> np.ndarray:
    """A fixed set of unit-variance noise fields, reused (flipped) by every image to keep rendering cheap."""
    return np.random.default_rng(20260101).standard_normal((8, image_size, image_size, 3), np.float32)


def _pose_coefficients(rng: np.random.Generator, nuisance: Nuisance, image_size: int,
                       template_size: int) -> tuple[float, ...]:
    """PIL AFFINE coefficients mapping output pixels to template pixels for one random pose."""
    angle = np.deg2rad(rng.uniform(-nuisance.max_rotation_deg, nuisance.max_rotation_deg))
    scale = rng.uniform(*nuisance.scale_range)
    squeeze = rng.uniform(*nuisance.squeeze_range)
    shift = rng.uniform(-nuisance.max_shift, nuisance.max_shift, 2)
    # face coords f -> output canonical q = R(angle) @ diag(scale*squeeze, scale) @ f + shift; invert it.
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rotation @ np.diag([scale * squeeze, scale])
    inverse = np.linalg.inv(forward)
    # output pixel p -> q = (p + 0.5) * 2 / S - 1;  f -> template pixel t = (f / M + 1) * T / 2 - 0.5
    out_scale, tpl_scale = 2.0 / image_size, template_size / (2.0 * TEMPLATE_MARGIN)
    linear = tpl_scale * inverse * out_scale
    offset = tpl_scale * inverse @ (np.full(2, 0.5 * out_scale - 1.0) - shift) + template_size / 2.0 - 0.5
    return (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])


def _light_table(rng: np.random.Generator, nuisance: Nuisance) -> list[int]:
    """A 768-entry PIL point table applying gain, gamma and a colour cast per channel."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    gain, gamma = rng.uniform(*nuisance.gain_range), rng.uniform(*nuisance.gamma_range)
    cast = 1.0 + rng.uniform(-nuisance.color_cast, nuisance.color_cast, 3)
    table = np.clip(255.0 * gain * cast[:, None] * levels[None, :] ** gamma, 0, 255)
    return np.rint(table).astype(np.int64).ravel().tolist()


def render_identity(seed: int, identity: int, count: int, image_size: int = 112, stream: int = 0,
                    nuisance: Nuisance = DEFAULT_NUISANCE) -> np.ndarray:
    """`count` images of `identity` as uint8 [count, S, S, 3]; `stream` picks an independent set of images."""
    template = Image.fromarray(np.rint(identity_template(seed, identity, image_size)).astype(np.uint8))
    # Nearest-neighbour warps of a 2x upsampled template: half-pixel accuracy, 1/10 the cost of bilinear.
    template = template.resize((2 * template.width, 2 * template.height), Image.Resampling.BILINEAR)
    rng = np.random.default_rng([seed, 0, identity, 2 + stream])
    usual = np.random.default_rng([seed, 0, identity, 1]).uniform(30, 225, 3)  # the identity's usual backdrop
    backdrops = _backgrounds(rng, count, max(8, image_size // 4), nuisance, usual)  # smooth: low resolution
    size = (image_size, image_size)
    images = np.empty((count, image_size, image_size, 3), np.float32)
    for k in range(count):
        head = template.transform(size, Image.Transform.AFFINE, _pose_coefficients(
            rng, nuisance, image_size, template.width), resample=Image.Resampling.NEAREST)
        photo = Image.fromarray(backdrops[k], "RGB").resize(size, Image.Resampling.BILINEAR).convert("RGBA")
        photo = Image.alpha_composite(photo, head).convert("RGB")
        if rng.random() < nuisance.blur_probability:  # low resolution: down- then up-sample
            low = max(8, round(image_size / rng.uniform(1.3, nuisance.max_downscale)))
            photo = photo.resize((low, low), Image.Resampling.BOX).resize(size, Image.Resampling.BILINEAR)
        images[k] = np.asarray(photo.point(_light_table(rng, nuisance)), np.float32)
    _add_gradient_noise_occlusion(images, rng, nuisance)
    return np.clip(images, 0, 255, out=images).astype(np.uint8)


def _backgrounds(rng: np.random.Generator, count: int, size: int, nuisance: Nuisance,
                 usual: np.ndarray) -> np.ndarray:
    """Per-image backdrops, uint8 [count, size, size, 3]: a colour (partly the identity's `usual` one), a
    colour ramp and a colour wave."""
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    angle, freq, phase = rng.uniform(0, 2 * np.pi, (3, count, 1, 1)).astype(np.float32)
    freq = freq * 0.6 + 0.5
    along = np.cos(angle) * ramp[None, None, :] + np.sin(angle) * ramp[None, :, None]
    across = -np.sin(angle) * ramp[None, None, :] + np.cos(angle) * ramp[None, :, None]
    own = rng.uniform(40, 215, (count, 1, 1, 1))
    own = own + rng.uniform(-1, 1, (count, 1, 1, 3)) * nuisance.background_tint
    colors = nuisance.background_share * usual + (1 - nuisance.background_share) * own
    images = colors + along[..., None] * rng.uniform(-1, 1, (count, 1, 1, 3)) * nuisance.background_ramp
    images += np.cos(np.pi * freq * across + phase)[..., None] * rng.uniform(-1, 1, (count, 1, 1, 3)) * (
        nuisance.background_wave)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _add_gradient_noise_occlusion(images: np.ndarray, rng: np.random.Generator, nuisance: Nuisance) -> None:
    """Apply a linear light gradient, sensor noise and occluding rectangles to a float batch, in place."""
    count, size = images.shape[0], images.shape[1]
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    direction = rng.uniform(0, 2 * np.pi, count)
    strength = rng.uniform(0, nuisance.max_gradient, count).astype(np.float32)
    gx = (strength * np.cos(direction)).astype(np.float32)[:, None, None]
    gy = (strength * np.sin(direction)).astype(np.float32)[:, None, None]
    images *= (1.0 + gx * ramp[None, None, :] + gy * ramp[None, :, None])[..., None]
    bank = _noise_bank(size)
    for k in range(count):
        field = bank[rng.integers(len(bank))]
        field = field[:: 1 if rng.random() < 0.5 else -1, :: 1 if rng.random() < 0.5 else -1]
        images[k] += field * np.float32(rng.uniform(0, nuisance.max_noise_sigma))
        if rng.random() < nuisance.occlusion_probability:
            for _ in range(rng.integers(1, 3)):
                h, w = (rng.uniform(*nuisance.occlusion_size, 2) * size).astype(int)
                top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
                images[k, top:top + h, left:left + w] = rng.uniform(0, 255, 3).astype(np.float32)
