"""Draw the three sample style images in data/styles/.

Run:  python data/draw_styles.py

Only numpy and Pillow are used and every random choice comes from a seeded
generator, so the output is the same on every run. The images are drawn by
this project (no third-party artwork) and ship under the project's licence.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent / "styles"
W, H = 512, 512


def bristle_stroke(draw, pts, color, width, rng):
    """Paint one stroke as a bundle of thin parallel lines of jittered colour.

    A single flat line looks like vector art; the bundle imitates the streaks
    a loaded brush leaves, which gives style transfer texture to pick up.
    """
    pts = np.asarray(pts, dtype=float)
    d = np.gradient(pts, axis=0)
    normal = np.stack([-d[:, 1], d[:, 0]], 1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    # Solid body first so the bristle streaks never leave holes.
    draw.line([tuple(p) for p in pts], fill=tuple(color), width=int(width), joint="curve")
    for q in (pts[0], pts[-1]):  # round caps, like the tip of a brush
        draw.ellipse([*(q - width / 2), *(q + width / 2)], fill=tuple(color))
    for off in np.linspace(-width / 2, width / 2, max(2, int(width))):
        c = np.clip(np.array(color) + rng.normal(0, 18, 3), 0, 255).astype(int)
        line = pts + normal * (off + rng.normal(0, 0.6))
        draw.line([tuple(p) for p in line], fill=tuple(c), width=2)


def swirls(rng):
    """Starry-Night-like: strokes follow a flow field made of a few vortices."""
    centres = rng.uniform(0, 1, (7, 2)) * [W, H]
    spins = rng.choice([-1.0, 1.0], 7) * rng.uniform(0.6, 1.4, 7)

    def flow(p):
        # Sum of vortices (tangential flow) plus a gentle rightward drift.
        v = np.array([1.0, 0.15])
        for c, s in zip(centres, spins):
            r = p - c
            d2 = r @ r + 400.0
            v += s * 90.0 * np.array([-r[1], r[0]]) / d2
        return v / (np.linalg.norm(v) + 1e-9)

    img = Image.new("RGB", (W, H), (20, 35, 90))
    draw = ImageDraw.Draw(img)
    blues = [(25, 50, 130), (40, 90, 170), (70, 130, 200), (120, 170, 220)]
    yellows = [(240, 200, 60), (250, 230, 120), (230, 160, 40)]
    for i in range(2600):
        p = rng.uniform(-20, [W + 20, H + 20])
        pts = [p]
        for _ in range(int(rng.integers(6, 16))):
            pts.append(pts[-1] + 4.0 * flow(pts[-1]))
        # Yellow strokes cluster near vortex centres, like glowing stars.
        near = np.min(np.linalg.norm(centres - p, axis=1)) < 45
        pal = yellows if near or rng.random() < 0.08 else blues
        col = pal[int(rng.integers(len(pal)))]
        bristle_stroke(draw, pts, col, rng.uniform(4, 9), rng)
    return img


def mosaic(rng):
    """Stained glass: Voronoi cells in saturated colours with dark lead lines."""
    seeds = rng.uniform(0, 1, (170, 2)) * [W, H]
    yy, xx = np.mgrid[0:H, 0:W]
    # Nearest seed per pixel, one seed at a time to keep memory small.
    best = np.full((H, W), np.inf)
    label = np.zeros((H, W), int)
    for i, (sx, sy) in enumerate(seeds):
        d2 = (xx - sx) ** 2 + (yy - sy) ** 2
        label[d2 < best] = i
        best = np.minimum(best, d2)
    palette = np.array([(200, 30, 40), (30, 80, 190), (250, 190, 30), (30, 150, 70),
                        (120, 40, 160), (240, 110, 20), (20, 160, 180)])
    colors = palette[rng.integers(len(palette), size=len(seeds))]
    colors = np.clip(colors + rng.normal(0, 20, colors.shape), 0, 255)
    rgb = colors[label]
    # Brighter toward each cell's centre: light shining through uneven glass.
    dist = np.sqrt(best)
    rgb *= (1.15 - 0.35 * np.clip(dist / 30.0, 0, 1))[..., None]
    rgb += rng.normal(0, 10, rgb.shape)  # grainy glass
    # Lead lines: pixels whose neighbour belongs to another cell, thickened.
    edge = np.zeros((H, W), bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    lead = Image.fromarray((edge * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(5))
    rgb[np.asarray(lead) > 0] = (25, 20, 20)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def brushstrokes(rng):
    """Thick diagonal impasto strokes in a warm palette, painted in layers."""
    img = Image.new("RGB", (W, H), (120, 50, 30))
    draw = ImageDraw.Draw(img)
    warm = [(200, 60, 30), (230, 120, 40), (245, 180, 70), (150, 40, 40),
            (250, 220, 150), (110, 30, 50), (210, 90, 90)]
    # Big strokes first, then smaller ones on top, as a painter would.
    for width, count in [(40, 120), (24, 260), (12, 500)]:
        for _ in range(count):
            p = rng.uniform(-40, [W + 40, H + 40])
            ang = np.deg2rad(-40 + rng.normal(0, 12))  # mostly one diagonal
            length = rng.uniform(3.0, 6.0) * width
            t = np.linspace(0, 1, 12)[:, None]
            bend = np.sin(t * np.pi) * rng.normal(0, width * 0.15)
            direction = np.array([np.cos(ang), np.sin(ang)])
            normal = np.array([-direction[1], direction[0]])
            pts = p + t * length * direction + bend * normal
            col = warm[int(rng.integers(len(warm)))]
            bristle_stroke(draw, pts, col, width * rng.uniform(0.7, 1.1), rng)
    return img


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, fn, seed in [("swirls", swirls, 1), ("mosaic", mosaic, 2),
                           ("brushstrokes", brushstrokes, 3)]:
        # One generator per image, so editing one style leaves the others alone.
        img = fn(np.random.default_rng(seed))
        img.save(OUT / f"{name}.jpg", quality=90)
        print(f"wrote {OUT / (name + '.jpg')} {img.size}")
