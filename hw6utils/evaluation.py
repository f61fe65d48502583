"""Metrics and pictures: the automatic colour/shape check of the shapes set, image grids, the loss plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .data import COLOURS, PLACES, SIZES

MIN_PIXELS = 12          # fewer foreground pixels than this = a blank image


def _convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def check_shape_image(image) -> dict:
    """Read colour, shape, size and place off one image of a single shape on white.

    Foreground = pixels with some channel below 0.65. Colour = nearest palette colour to the median
    foreground pixel. Shape from the bounding-box fill ratio (square ~1, circle ~pi/4, triangle ~1/2)
    and solidity = area / convex-hull area (a star is far from convex).
    """
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    rgb = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255.0
    mask = rgb.min(axis=2) < 0.65
    count = int(mask.sum())
    if count < MIN_PIXELS:
        return {"colour": None, "shape": None, "size": None, "place": None, "pixels": count}
    median = np.median(rgb[mask], axis=0) * 255
    colour = min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - median) ** 2)))
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = count / float(height * width)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    solidity = count / max(_convex_hull_area(corners), 1.0)
    if solidity < 0.75:
        shape = "star"
    elif fill >= 0.93:
        shape = "square"
    elif fill >= 0.66:
        shape = "circle"
    else:
        shape = "triangle"
    radius = max(height, width) / 2 / 64
    size = min(SIZES, key=lambda s: abs(SIZES[s] * (0.85 if shape == "square" else 1.0) - radius))
    cx, cy = (xs.min() + xs.max() + 1) / 2 / 64, (ys.min() + ys.max() + 1) / 2 / 64
    place = min(PLACES, key=lambda p: (PLACES[p][1] - cx) ** 2 + (PLACES[p][2] - cy) ** 2)
    return {"colour": colour, "shape": shape, "size": size, "place": place, "pixels": count,
            "fill": round(fill, 3), "solidity": round(solidity, 3)}


def score_shape_images(images: list, entries: list) -> dict:
    """Accuracy of colour, shape and both, overall and split by held-out pair and phrasing.

    images: PIL images; entries: dicts with `colour`, `shape` and optionally `held_out`, `phrasing`.
    """
    rows = []
    for image, entry in zip(images, entries):
        found = check_shape_image(image)
        rows.append({"colour_ok": found["colour"] == entry["colour"], "shape_ok": found["shape"] == entry["shape"],
                     "held_out": bool(entry.get("held_out", False)), "phrasing": entry.get("phrasing", "seen")})
    for row in rows:
        row["both_ok"] = row["colour_ok"] and row["shape_ok"]

    def rate(subset, key):
        return round(sum(r[key] for r in subset) / len(subset), 4) if subset else float("nan")

    return {"n": len(rows), "colour": rate(rows, "colour_ok"), "shape": rate(rows, "shape_ok"),
            "colour_shape": rate(rows, "both_ok"),
            "colour_shape_held_out": rate([r for r in rows if r["held_out"]], "both_ok"),
            "colour_shape_trained_pairs": rate([r for r in rows if not r["held_out"]], "both_ok"),
            "colour_shape_unseen_phrasing": rate([r for r in rows if r["phrasing"] == "unseen"], "both_ok")}


def format_scores(name: str, scores: dict) -> str:
    return (f"{name}: colour+shape {scores['colour_shape']:.0%} of {scores['n']} prompts "
            f"(held-out pairs {scores['colour_shape_held_out']:.0%}, unseen phrasings "
            f"{scores['colour_shape_unseen_phrasing']:.0%}; colour {scores['colour']:.0%}, shape {scores['shape']:.0%})")


def image_grid(images: list, cols: int = 8, pad: int = 2) -> Image.Image:
    """Paste equally sized PIL images into one grid image (white padding)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    width, height = images[0].size
    rows = math.ceil(len(images) / cols)
    cols = min(cols, len(images))
    grid = Image.new("RGB", (cols * (width + pad) + pad, rows * (height + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), (pad + (i % cols) * (width + pad), pad + (i // cols) * (height + pad)))
    return grid


def plot_history(history: list, path=None):
    """Loss (and learning rate) against optimizer step; saved to `path` when given. Returns the figure.

    Built with matplotlib's object API (no pyplot state, no backend switch), so it works the same in a
    script and in a notebook, where the returned figure displays itself.
    """
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(steps, [h["loss"] for h in history], label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if history and "lr" in history[0]:
        twin = ax.twinx()
        twin.plot(steps, [h["lr"] for h in history], color="tab:orange", alpha=0.5, label="learning rate")
        twin.set_ylabel("learning rate")
    ax.set_title("training loss")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def load_history(path) -> list:
    return json.loads(Path(path).read_text())


def evaluate_shapes(model, entries: list, guidance_scale: float = 7.5, num_inference_steps: int = 50,
                    seed: int = 0, batch_size: int = 32, progress: bool = False) -> tuple:
    """Generate one image per prompt entry (dicts with text_prompt, colour, shape) and score them.

    Returns (scores, images). Image i uses seed + i, so the figures are reproducible.
    """
    from .sampling import generate_images

    prompts = [e["text_prompt"] for e in entries]
    images = generate_images(model, prompts, [seed + i for i in range(len(prompts))], guidance_scale,
                             num_inference_steps, batch_size=batch_size, progress=progress)
    return score_shape_images(images, entries), images
