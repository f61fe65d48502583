"""Metrics and pictures: the automatic colour/shape check of the shapes set, image grids, the loss plot."""
from __future__ import annotations

import csv
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .data import COLOURS, PLACES, SIZES

MIN_PIXELS = 12          # fewer foreground pixels than this = a blank image
NEAR_WHITE = 0.8         # a pixel with every channel above this is background
MIN_BACKGROUND = 0.5     # an image less than half near-white has no clear background (a shape covers <= 30%)
MIN_MAIN_PART = 0.5      # the largest connected piece must hold half the foreground, or it is scattered specks
CORNER = 0.2             # side of the four corner patches of the bounding box, as a fraction of its side
MIN_CORNER_FILL = 0.4    # a square fills its corner patches (1.0), a circle leaves them nearly empty (~0.1)
# Half the bounding box's longer side, over the radius the shape was drawn with (render_shape, shape_polygon):
# a square's corners sit at 0.85 r, a triangle's half-width is sqrt(3)/2 r, a star's sin(72 deg) r.
EXTENT_PER_RADIUS = {"circle": 1.0, "square": 0.85, "triangle": math.sqrt(3) / 2, "star": math.sin(math.radians(72))}
ATTRIBUTES = ("colour", "shape", "size", "place")


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


def _main_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece of a boolean mask (specks elsewhere dropped)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def _corner_fill(box: np.ndarray) -> float:
    """The mean foreground fraction of the four corner patches (CORNER of the side) of a shape's bounding box."""
    k = max(1, round(CORNER * min(box.shape)))
    return float(np.mean([box[:k, :k].mean(), box[:k, -k:].mean(), box[-k:, :k].mean(), box[-k:, -k:].mean()]))


def _no_shape(pixels: int, problem: str) -> dict:
    return {"colour": None, "shape": None, "size": None, "place": None, "pixels": pixels, "problem": problem}


def check_shape_image(image) -> dict:
    """Read colour, shape, size and place off one image of a single shape on white.

    Foreground = pixels with some channel below 0.65. No shape is read (every attribute None, `problem` says why)
    from a blank image, from one without a clear white background (less than half of it near-white: a single
    fill, noise) or from scattered specks (no piece holds half the foreground). Otherwise the largest piece is
    the shape. Colour = nearest palette colour to its median pixel. Shape from the bounding-box fill ratio
    (square ~1, circle ~pi/4, triangle ~1/2) and solidity = area / convex-hull area (a star is far from convex).
    Size = the drawn radius nearest to the one the box implies; place = the nearest of the five centres.
    Square or circle: a box fill of 0.93 or more is a square; below it, the corners decide: a generated square's
    edges may waver (fill 0.84-0.92, no longer near 1) while its corners stay, and a circle's corners are empty.
    """
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    rgb = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255.0
    foreground = rgb.min(axis=2) < 0.65
    total = int(foreground.sum())
    if total < MIN_PIXELS:
        return _no_shape(total, "blank")
    if (rgb.min(axis=2) > NEAR_WHITE).mean() < MIN_BACKGROUND:
        return _no_shape(total, "no clear background")
    mask = _main_part(foreground)
    count = int(mask.sum())
    if count < MIN_MAIN_PART * total:
        return _no_shape(total, "scattered")
    median = np.median(rgb[mask], axis=0) * 255
    colour = min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - median) ** 2)))
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = count / float(height * width)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    solidity = count / max(_convex_hull_area(corners), 1.0)
    if solidity < 0.75:
        shape = "star"
    elif fill >= 0.93 or (fill >= 0.66 and _corner_fill(box) >= MIN_CORNER_FILL):
        shape = "square"
    elif fill >= 0.66:
        shape = "circle"
    else:
        shape = "triangle"
    radius = max(height, width) / 2 / 64 / EXTENT_PER_RADIUS[shape]
    size = min(SIZES, key=lambda s: abs(SIZES[s] - radius))
    cx, cy = (xs.min() + xs.max() + 1) / 2 / 64, (ys.min() + ys.max() + 1) / 2 / 64
    place = min(PLACES, key=lambda p: (PLACES[p][1] - cx) ** 2 + (PLACES[p][2] - cy) ** 2)
    return {"colour": colour, "shape": shape, "size": size, "place": place, "pixels": count, "problem": None,
            "fill": round(fill, 3), "solidity": round(float(solidity), 3)}


SPLITS = {"held_out": lambda row: row["held_out"], "trained_pairs": lambda row: not row["held_out"],
          "seen_phrasing": lambda row: row["phrasing"] == "seen",
          "unseen_phrasing": lambda row: row["phrasing"] == "unseen"}
MEASURES = ("colour", "shape", "size", "place", "colour_shape", "all_four")


def _judge(found: dict, entry: dict) -> dict:
    """One prompt's row: what it asks, what the check read, and whether each asked attribute is right (None if
    the prompt does not ask it)."""
    row = {"prompt": entry.get("text_prompt"), "held_out": bool(entry.get("held_out", False)),
           "phrasing": entry.get("phrasing", "seen"), "problem": found["problem"]}
    for attribute in ATTRIBUTES:
        asked = entry.get(attribute)
        row[attribute], row[f"found_{attribute}"] = asked, found[attribute]
        row[f"{attribute}_ok"] = None if asked is None else found[attribute] == asked
    verdicts = [row[f"{attribute}_ok"] for attribute in ATTRIBUTES]
    row["colour_shape_ok"] = None if None in verdicts[:2] else all(verdicts[:2])
    row["all_four_ok"] = None if None in verdicts else all(verdicts)
    row["all_ok"] = all(v for v in verdicts if v is not None)
    return row


def score_shape_images(images: list, entries: list) -> dict:
    """Accuracy of colour, shape, size, place, colour+shape and all four, overall and per split.

    images: PIL images; entries: dicts with the `colour`, `shape`, `size` and `place` asked for (missing or None:
    not scored for that prompt) and optionally `text_prompt`, `held_out`, `phrasing` ('seen' or 'unseen').
    Returns n, n_<measure> (prompts that ask it), <measure> and <measure>_<split> rates (splits: held_out,
    trained_pairs, seen_phrasing, unseen_phrasing; nan where no prompt counts), and `per_prompt`: one row each.
    """
    rows = [_judge(check_shape_image(image), entry) for image, entry in zip(images, entries)]

    def rate(subset, measure):
        verdicts = [row[f"{measure}_ok"] for row in subset if row[f"{measure}_ok"] is not None]
        return round(sum(verdicts) / len(verdicts), 4) if verdicts else float("nan")

    scores = {"n": len(rows)}
    for measure in MEASURES:
        scores[f"n_{measure}"] = sum(row[f"{measure}_ok"] is not None for row in rows)
        scores[measure] = rate(rows, measure)
        for split, keep in SPLITS.items():
            scores[f"{measure}_{split}"] = rate([row for row in rows if keep(row)], measure)
    scores["per_prompt"] = rows
    return scores


def _percent_parts(scores: dict, measure: str, labels: dict) -> str:
    """'held-out pairs 92%, unseen phrasings 90%' for the splits of a measure that have prompts."""
    return ", ".join(f"{label} {scores[f'{measure}_{split}']:.0%}" for split, label in labels.items()
                     if not math.isnan(scores[f"{measure}_{split}"]))


def format_scores(name: str, scores: dict) -> str:
    """One line: colour+shape (with its splits, colour and shape), then size, place and all four where asked."""
    splits = _percent_parts(scores, "colour_shape", {"held_out": "held-out pairs", "unseen_phrasing": "unseen phrasings"})
    line = (f"{name}: colour+shape {scores['colour_shape']:.0%} of {scores['n']} prompts ("
            + (f"{splits}; " if splits else "") + f"colour {scores['colour']:.0%}, shape {scores['shape']:.0%})")
    asked = [f"{measure} {scores[measure]:.0%}" for measure in ("size", "place") if scores.get(f"n_{measure}")]
    if scores.get("n_all_four"):
        phrasings = _percent_parts(scores, "all_four", {"seen_phrasing": "training-style", "unseen_phrasing": "unseen"})
        asked.append(f"all four {scores['all_four']:.0%} of {scores['n_all_four']} prompts ({phrasings})")
    return line + ("; " + ", ".join(asked) if asked else "")


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


def evaluate_shapes(model, entries: list, *, guidance_scale: float | None = None, num_inference_steps: int | None = None,
                    seed: int = 0, batch_size: int = 32, progress: bool = False) -> tuple:
    """Generate one image per prompt entry (dicts with text_prompt, colour, shape) and score them.

    Returns (scores, images). Image i uses seed + i, so the figures are reproducible.
    """
    from .sampling import generate_images

    prompts = [e["text_prompt"] for e in entries]
    images = generate_images(model, prompts, [seed + i for i in range(len(prompts))], guidance_scale=guidance_scale,
                             num_inference_steps=num_inference_steps, batch_size=batch_size, progress=progress)
    return score_shape_images(images, entries), images


def save_evaluation(out_dir, name: str, scores: dict, images: list) -> Path:
    """Write eval_<name>.json (the scores, per prompt too) and eval_<name>.png (the images' grid) into out_dir, as
    `hw6 evaluate` and notebook 07 both do; returns the JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=12).save(out / f"eval_{name}.png")
    path = out / f"eval_{name}.json"
    path.write_text(json.dumps(scores, indent=1))
    return path


# ----------------------------------------------------------------------------------------------- during training
def training_scorer(cfg):
    """For cfg.train.eval_metric: a function model -> {"score": higher is better, other figures to log}, or None.

    'shapes': colour+shape accuracy on the first eval_limit fixed prompts (size, place and all four logged too). 'fid': the course's FID (and CLIP-T
    with eval_clip) of the first eval_limit test.json prompts against eval_stats; on a subset FID runs high, so
    it ranks checkpoints of one run rather than matching the leaderboard. Everything is loaded here, once.
    """
    from .sampling import generate_images
    t, s = cfg.train, cfg.sample
    if not t.eval_metric:
        return None
    if t.eval_metric == "shapes":
        from .data import shape_test_entries
        entries = list(shape_test_entries(cfg.data.data_seed).values())[:t.eval_limit]

        def score_shapes(model) -> dict:
            scores, _ = evaluate_shapes(model, entries, guidance_scale=s.guidance_scale,
                                        num_inference_steps=s.num_inference_steps, batch_size=s.gen_batch_size)
            return {"score": scores["colour_shape"],
                    **{k: scores[k] for k in ["colour_shape", "size", "place", "all_four"] if k in scores}}
        return score_shapes
    if t.eval_metric != "fid":
        raise ValueError(f"eval_metric must be '', 'shapes' or 'fid', got {t.eval_metric!r}")
    from .config import test_json_path
    from .data import load_test_prompts
    from .scoring import clip_t, compute_stats, frechet_distance, load_clip, load_inception, load_stats
    if not t.eval_stats:
        raise ValueError("eval_metric='fid' needs eval_stats: a folder with test_mu.npy and test_sigma.npy")
    mu_ref, sigma_ref = load_stats(t.eval_stats)
    extractor = load_inception(t.eval_inception or None)
    clip = load_clip(t.eval_clip) if t.eval_clip else None
    prompts = [prompt for _, prompt, _ in load_test_prompts(test_json_path(cfg))][:t.eval_limit]

    def score_fid(model) -> dict:
        images = generate_images(model, prompts, list(range(len(prompts))), guidance_scale=s.guidance_scale,
                                 num_inference_steps=s.num_inference_steps, batch_size=s.gen_batch_size, progress=False)
        device = model.pipe.unet.device
        fid = frechet_distance(*compute_stats(images, extractor.to(device), device=device), mu_ref, sigma_ref)
        out = {"score": -fid, "fid": fid}
        if clip is not None:
            out["clip_t"] = clip_t(images, prompts, *clip)
        return out
    return score_fid


# ----------------------------------------------------------------------------------------------- sweeps
def shape_sweep_scorer(entries: list):
    """score_images for `sweep` on the shapes set's prompt entries: the colour/shape accuracies, each in [0, 1]."""
    names = {"colour_shape": "colour_shape", "held_out": "colour_shape_held_out",
             "unseen_phrasing": "colour_shape_unseen_phrasing", "colour": "colour", "shape": "shape"}

    def score_images(images, cell) -> dict:
        scores = score_shape_images(images, entries)
        return {column: scores[key] for column, key in names.items()}

    return score_images


def sweep(model, prompts: list, score_images, guidance_scales, steps, samplers=("ddim",), *, seed: int = 0,
          batch_size: int = 32) -> list:
    """Generate and score one image per prompt for every sampler x steps x guidance scale of one loaded checkpoint.

    model: a `sampling.LoadedModel`; image i of every cell uses seed + i, so the cells differ only by their settings.
    score_images(images, cell) returns the figures of one cell (cell = {"sampler", "steps", "guidance"}).
    Returns one row per cell: its settings, its figures, and the generation time per image in seconds.
    """
    from .checkpoints import is_stable_diffusion
    from .sampling import generate_images, make_sampler

    pipe, loaded = model.pipe, model.pipe.scheduler
    # swapped the diffusers way (pipe.scheduler = ...); an unknown name fails before any work
    sampler_of = {name: make_sampler(loaded.config, name, is_stable_diffusion(model.cfg)) for name in samplers}
    seeds = [seed + i for i in range(len(prompts))]
    rows = []
    try:
        for name, num_steps, guidance in itertools.product(samplers, steps, guidance_scales):
            cell = {"sampler": name, "steps": int(num_steps), "guidance": float(guidance)}
            pipe.scheduler = sampler_of[name]
            start = time.perf_counter()
            images = generate_images(model, prompts, seeds, guidance_scale=guidance, num_inference_steps=num_steps,
                                     batch_size=batch_size, progress=False)
            seconds = (time.perf_counter() - start) / len(prompts)
            rows.append({**cell, **score_images(images, cell), "s_per_image": round(seconds, 4)})
            print(f"{name} {num_steps} steps, guidance {guidance:g}: {seconds:.3f} s/image")
    finally:
        pipe.scheduler = loaded
    return rows


def write_sweep(rows: list, out_dir) -> str:
    """Save the rows of `sweep` as sweep.csv, sweep.json and sweep.md in out_dir; return the Markdown table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with (out_dir / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    cells = [[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    table = "\n".join("| " + " | ".join(line) + " |" for line in [columns, ["---"] * len(columns), *cells])
    (out_dir / "sweep.md").write_text(table + "\n")
    return table
