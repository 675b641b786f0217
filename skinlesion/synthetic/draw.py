"""Drawing one synthetic image: the lesion in its canonical frame, then skin, placement,
hair, focus, lighting, sensor grain and fine texture (real-like JPEG sizes)."""

from __future__ import annotations

import io
import math
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from skinlesion.synthetic.looks import lesion_look
from skinlesion.synthetic.metadata import ImageSpec

WIDTH, HEIGHT = 600, 450

CANVAS = 264  # canonical lesion frame in pixels, spanning +-1.5 lesion radii
UNIT = CANVAS / 3  # pixels per lesion radius in the canonical frame
ANGLES = 720  # border radius lookup table resolution


@cache
def _polar_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """u, v (units), distance and angle-table index of every canonical pixel."""
    axis = (np.arange(CANVAS, dtype=np.float32) - CANVAS / 2 + 0.5) / UNIT
    u, v = np.meshgrid(axis, axis)
    d = np.hypot(u, v)
    idx = ((np.arctan2(v, u) + np.pi) / (2 * np.pi) * ANGLES).astype(np.int32) % ANGLES
    return u, v, d, idx


def _noise(rng: np.random.Generator, cells: int, size: tuple[int, int]) -> np.ndarray:
    """Smooth noise in about [0, 1]: a cells x cells random grid upsampled bicubically."""
    grid = rng.integers(0, 256, (cells, cells), dtype=np.uint8)  # 8-bit: fast resize
    smooth = Image.fromarray(grid, "L").resize(size, Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) * np.float32(1 / 255)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _lerp(colour: np.ndarray, target: Any, amount: np.ndarray) -> np.ndarray:
    """colour -> target by amount (per pixel), in place; skipped where amount is all ~0."""
    if float(amount.max()) > 0.004:
        colour += (np.asarray(target, dtype=np.float32) - colour) * amount[..., None]
    return colour


def _border(look: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Border radius (units) per angle: 1 + random harmonics scaled by irregularity."""
    phi = np.linspace(-np.pi, np.pi, ANGLES, endpoint=False)
    r = np.ones(ANGLES)
    for k in range(2, 9):
        amp = look["irregular"] * rng.normal(0, 1) / k**0.7
        r += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.clip(r, 0.45, 1.45).astype(np.float32)


def _at(border: np.ndarray, phi: np.ndarray | float) -> Any:
    return border[(((np.asarray(phi) + np.pi) / (2 * np.pi) * ANGLES).astype(int)) % ANGLES]


def _xy(rho: Any, phi: Any) -> tuple[Any, Any]:
    """Canonical pixel coordinates of polar (units, radians) positions."""
    return CANVAS / 2 + rho * UNIT * np.cos(phi), CANVAS / 2 + rho * UNIT * np.sin(phi)


def _inside(
    border: np.ndarray, rng: np.random.Generator, n: int, reach: float = 0.92
) -> np.ndarray:
    """n random canonical pixel positions inside the lesion, shape (n, 2)."""
    phi = rng.uniform(-np.pi, np.pi, n)
    return np.stack(_xy(np.sqrt(rng.random(n)) * reach * _at(border, phi), phi), 1)


def _layer_array(layer: Image.Image) -> np.ndarray:
    return np.asarray(layer.filter(ImageFilter.BoxBlur(1)), dtype=np.float32) / 255


# Dot-like structures: (look field, colour, radius range in lesion radii, max count).
DOTS = (
    ("dark_dots", (0.10, 0.07, 0.07), (0.02, 0.045), 70),
    ("red_clods", (0.45, 0.06, 0.18), (0.07, 0.17), 28),
    ("blue_nests", (0.36, 0.42, 0.55), (0.06, 0.14), 14),
    ("light_cysts", (0.93, 0.88, 0.72), (0.03, 0.065), 36),
)


def _dots_layer(
    border: np.ndarray,
    amount: float,
    radii: tuple[float, float],
    count: int,
    rng: np.random.Generator,
) -> np.ndarray | None:
    n = int(rng.poisson(amount * count))
    if n == 0:
        return None
    layer = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(layer)
    sizes = rng.uniform(*radii, n) * UNIT
    for (x, y), r, squash in zip(
        _inside(border, rng, n), sizes, rng.uniform(0.6, 1, n), strict=True
    ):
        draw.ellipse(
            (x - r, y - r * squash, x + r, y + r * squash), fill=int(rng.integers(170, 256))
        )
    return _layer_array(layer)


def _vessels_layer(
    border: np.ndarray, amount: float, rng: np.random.Generator
) -> np.ndarray | None:
    """Branching red vessels (arborizing in bcc), drawn as random-walk trees."""
    trees = int(rng.poisson(amount * 6))
    if trees == 0:
        return None
    layer = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(layer)
    for x, y in _inside(border, rng, trees, reach=0.7):
        stack = [(x, y, rng.uniform(0, 2 * np.pi), int(rng.integers(2, 4)), 0)]
        while stack:
            x0, y0, angle, width, depth = stack.pop()
            if depth > 7 or width < 1:
                continue
            angle += rng.normal(0, 0.45)
            length = rng.uniform(0.06, 0.17) * UNIT
            x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
            draw.line((x0, y0, x1, y1), fill=230, width=width)
            stack.append((x1, y1, angle, width, depth + 1))
            if rng.random() < 0.35:
                turn = rng.choice((-1, 1)) * rng.uniform(0.4, 1.0)
                stack.append((x1, y1, angle + turn, width - 1, depth + 1))
    return _layer_array(layer)


def _streaks_layer(
    border: np.ndarray, amount: float, rng: np.random.Generator
) -> np.ndarray | None:
    """Radial streaks / pseudopods at the periphery (reaching beyond the border)."""
    n = int(rng.poisson(amount * 24))
    if n == 0:
        return None
    layer = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(layer)
    phi = rng.uniform(-np.pi, np.pi) + rng.normal(0, 1.2, n)  # clustered on one side
    r = _at(border, phi)
    x0, y0 = _xy(0.8 * r, phi)
    x1, y1 = _xy(rng.uniform(1.02, 1.22, n) * r, phi)
    tip = 0.02 * UNIT
    for i in range(n):
        draw.line((x0[i], y0[i], x1[i], y1[i]), fill=200, width=int(rng.integers(1, 3)))
        draw.ellipse((x1[i] - tip, y1[i] - tip, x1[i] + tip, y1[i] + tip), fill=200)
    return _layer_array(layer)


def _network(look: dict[str, Any], mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reticular pigment network: darkening factor of thin, warped lattice lines in patches."""
    u, v, _, _ = _polar_grid()
    size = (CANVAS, CANVAS)
    f, turn = rng.uniform(16, 24), rng.uniform(0, np.pi)
    uw = u * math.cos(turn) + v * math.sin(turn) + 0.12 * _noise(rng, 14, size)
    vw = v * math.cos(turn) - u * math.sin(turn) + 0.12 * _noise(rng, 14, size)
    lines = (1 - np.abs(np.sin(f * uw)) * np.abs(np.sin(f * vw))) ** 8
    where = _smoothstep((_noise(rng, 5, size) - 0.25) * 2) * mask
    return 1 - 0.5 * look["network"] * lines * where


def render_lesion(look: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """The lesion in its canonical frame as RGBA (alpha = lesion coverage)."""
    _, _, d, idx = _polar_grid()
    size = (CANVAS, CANVAS)
    border = _border(look, rng)
    t = d / border[idx]  # 1 on the border
    mask = _smoothstep((1 - t) / max(look["softness"], 0.01) + 0.5)
    inner = _smoothstep((0.95 - t) / 0.15)
    # Base: centre -> rim colour, blotches, uneven pigment.
    rgb = np.empty((*d.shape, 3), dtype=np.float32)
    rgb[:] = look["centre"]
    _lerp(rgb, look["rim"], np.clip(t, 0, 1) ** look["gamma"])
    _lerp(
        rgb,
        look["blotch"],
        _smoothstep((_noise(rng, 5, size) - 1 + look["blotch_amount"]) * 4) * inner,
    )
    rgb *= (0.9 + 0.2 * _noise(rng, 9, size))[..., None]
    if look["network"] > 0.05:
        rgb *= _network(look, mask, rng)[..., None]
    # Blue-white veil and whitish central scar (dermatofibroma).
    veil = _smoothstep((_noise(rng, 4, size) - (1 - 0.8 * look["veil"])) * 3) * inner
    _lerp(rgb, (0.52, 0.58, 0.70), 0.8 * veil)
    _lerp(rgb, (0.95, 0.92, 0.90), _smoothstep((0.6 - t) / 0.3) * look["patch"])
    # Surface scale: white-yellow flakes in patches.
    if look["scale"] > 0.05:
        flakes = rng.random((CANVAS // 3, CANVAS // 3), dtype=np.float32) > 0.5
        flakes_full = np.repeat(np.repeat(flakes, 3, 0), 3, 1).astype(np.float32)
        patches = _smoothstep((_noise(rng, 6, size) - (1 - look["scale"])) * 3)
        _lerp(rgb, (0.95, 0.92, 0.82), 0.85 * patches * (0.4 + 0.6 * flakes_full) * mask)
    for name, colour, radii, count in DOTS:
        layer = _dots_layer(border, look[name], radii, count, rng)
        if layer is not None:
            _lerp(rgb, colour, 0.9 * layer)
    vessels = _vessels_layer(border, look["vessels"], rng)
    if vessels is not None:
        _lerp(rgb, (0.72, 0.12, 0.16), 0.85 * vessels)
    alpha = mask * look["opacity"]
    streaks = _streaks_layer(border, look["streaks"], rng)
    if streaks is not None:
        _lerp(rgb, (0.22, 0.13, 0.10), streaks)
        alpha = np.maximum(alpha, 0.9 * streaks)
    rgba = np.empty((*d.shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.clip(rgb, 0, 1) * 255
    rgba[..., 3] = alpha * 255
    return Image.fromarray(rgba, "RGBA")


def _skin(rng: np.random.Generator) -> Image.Image:
    """Skin background: tone, mottling and redness, as an RGBA image."""
    light, tan = np.array([0.95, 0.78, 0.72]), np.array([0.76, 0.55, 0.44])
    tone = light + (tan - light) * rng.random() ** 1.5 + rng.normal(0, 0.025, 3)
    size = (WIDTH // 2, HEIGHT // 2)
    mottle = 0.93 + 0.08 * _noise(rng, 6, size) + 0.06 * _noise(rng, 24, size)
    red = _smoothstep(_noise(rng, 5, size) - 0.4) * rng.uniform(0, 0.12)
    rgb = tone.astype(np.float32) * mottle[..., None]
    rgb[..., 0] += red
    rgb[..., 1:] -= red[..., None] * 0.5
    half = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
    return half.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR).convert("RGBA")


def _place(
    canvas: Image.Image, lesion: Image.Image, look: dict[str, Any], rng: np.random.Generator
) -> None:
    """Composite the canonical lesion onto `canvas`, moved, rotated and scaled."""
    radius = look["radius"] * HEIGHT * math.exp(rng.normal(0, 0.12))
    cx = WIDTH / 2 + np.clip(rng.normal(0, 0.09), -0.2, 0.2) * WIDTH
    cy = HEIGHT / 2 + np.clip(rng.normal(0, 0.09), -0.2, 0.2) * HEIGHT
    angle = rng.uniform(0, 2 * np.pi)
    kx, ky = UNIT / (radius * look["aspect"]), UNIT / radius
    c, s = math.cos(angle), math.sin(angle)
    a, b, d, e = kx * c, kx * s, -ky * s, ky * c  # image offset -> canonical offset
    # Only the lesion's bounding box is transformed (the frame reaches 1.5 radii).
    reach = 1.5 * radius * look["aspect"]
    x0, y0 = max(0, int(cx - reach)), max(0, int(cy - reach))
    x1, y1 = min(WIDTH, int(cx + reach) + 1), min(HEIGHT, int(cy + reach) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    ox, oy = x0 - cx, y0 - cy
    coeffs = (a, b, CANVAS / 2 + a * ox + b * oy, d, e, CANVAS / 2 + d * ox + e * oy)
    placed = lesion.transform(
        (x1 - x0, y1 - y0), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
    )
    canvas.alpha_composite(placed, dest=(x0, y0))


def _hair(img: Image.Image, rng: np.random.Generator) -> None:
    if rng.random() > 0.45:
        return
    draw = ImageDraw.Draw(img)
    for _ in range(1 + int(rng.poisson(3))):
        x, y = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        angle, bend = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.08)
        points = [(x, y)]
        for _ in range(int(rng.integers(6, 16))):
            angle += bend + rng.normal(0, 0.05)
            x, y = x + 25 * math.cos(angle), y + 25 * math.sin(angle)
            points.append((x, y))
        shade = int(rng.integers(15, 70))
        draw.line(
            points,
            fill=(shade, int(shade * 0.8), int(shade * 0.7)),
            width=int(rng.integers(1, 4)),
            joint="curve",
        )


@cache
def _radius_grid() -> np.ndarray:
    """Distance from the centre of a half-resolution frame, in half image heights."""
    h, w = HEIGHT // 2, WIDTH // 2
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.hypot((x - w / 2) / (h / 2), (y - h / 2) / (h / 2))


def _lighting(rng: np.random.Generator) -> Image.Image:
    """Light field (gain, gradient, white balance, vignette, sometimes the scope's dark
    rim) as an RGB image to multiply with."""
    r = _radius_grid()
    ramp = np.linspace(-1, 1, r.shape[1], dtype=np.float32)[None, :] * rng.normal(0, 0.05)
    field = (
        rng.uniform(0.85, 0.97)
        * (1 + ramp)
        * (1 - rng.uniform(0, 0.35) * _smoothstep((r - 0.7) / 0.9))
    )
    if rng.random() < 0.3:
        edge = rng.uniform(1.0, 1.3)
        field = field * (0.08 + 0.92 * _smoothstep((edge - r) / 0.06))
    balance = np.exp(rng.normal(0, 0.03, 3)).astype(np.float32)
    rgb = np.clip(field[..., None] * balance, 0, 1) * 255
    half = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return half.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)


def render(spec: ImageSpec) -> bytes:
    """One 600x450 JPEG of `spec` (deterministic)."""
    look_rng = np.random.default_rng([spec.seed, 1, spec.lesion.index])
    look = lesion_look(spec.lesion.dx, look_rng)
    lesion = render_lesion(look, look_rng)
    rng = np.random.default_rng([spec.seed, 2, spec.index])
    canvas = _skin(rng)
    _place(canvas, lesion, look, rng)
    img = canvas.convert("RGB")
    _hair(img, rng)
    img = img.filter(ImageFilter.BoxBlur(rng.uniform(0.4, 1.2)))  # focus
    img = ImageChops.multiply(img, _lighting(rng))
    amp = int(rng.integers(2, 7))  # sensor grain
    grain = Image.fromarray(rng.integers(0, 2 * amp + 1, (HEIGHT, WIDTH), dtype=np.uint8), "L")
    img = ImageChops.add(img, grain.convert("RGB"), offset=-amp)
    rng.integers(85, 96)  # the JPEG quality of the light images before the texture (kept draw)
    # Own stream for the texture: the draws above (and so the image's content) stay as they were.
    detail = np.random.default_rng([spec.seed, 3, spec.index])
    pixels = np.asarray(img, dtype=np.float32) + _texture(detail)
    img = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(detail.integers(*JPEG_QUALITY)))
    return buf.getvalue()


# Real HAM10000 files average about 260 KB at 600x450 (and decode about twice as fast in
# JPEG draft mode as in full): fine skin texture and sensor noise that JPEG cannot squeeze,
# saved at high quality with the usual 4:2:0 chroma subsampling.
JPEG_QUALITY = (99, 101)  # drawn per image, high end excluded
FINE, MID, CHROMA = (7.0, 10.0), (3.0, 5.0), (1.5, 2.5)  # grey levels (std), drawn per image


def _texture(rng: np.random.Generator) -> np.ndarray:
    """Zero-mean texture to add to the image: pixel-scale grey detail (pores, grain),
    two-pixel-scale mottling and per-channel colour noise, each of a random strength."""
    fine = rng.standard_normal((HEIGHT, WIDTH), dtype=np.float32) * rng.uniform(*FINE)
    half = rng.standard_normal((HEIGHT // 2, WIDTH // 2), dtype=np.float32)
    mid = np.asarray(Image.fromarray(half, "F").resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR))
    grey = fine + mid * np.float32(rng.uniform(*MID))
    colour = rng.standard_normal((HEIGHT, WIDTH, 3), dtype=np.float32) * rng.uniform(*CHROMA)
    return grey[..., None] + colour
