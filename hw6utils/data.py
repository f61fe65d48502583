"""Course-format data: reading `train/` + `train_info.json` + `test.json`, and building the embedded sets.

The course format (spring 2025 homework):
    train/<monsterID>_<ACTION>_<frame>.png     ACTION is letters then optional digits: main, attack12, die2
    train_info.json  {"<monsterID>_<ACTION>": {"given_description": [str, ...], "action_description": str, ...}}
    test.json        {"<id>": {"text_prompt": str, "image_name": "<name>.png", ...}}
A caption is a random given description, a space, then the action description (drawn afresh each time the
image is used); an empty action description gives the description alone.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_NAME = re.compile(r"^(.+)_([A-Za-z]+\d*)_(\d+)\.(?i:png)$")  # <monsterID>_<ACTION>_<frame>.png


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class CourseData:
    """The training set of a course-format folder: one entry per image, captions per key."""
    root: Path
    image_paths: list            # every usable training image
    image_keys: list             # "<monsterID>_<ACTION>" of each image
    captions: dict               # key -> list of full captions (one per given description)
    problems: list = field(default_factory=list)  # warnings found while reading (also emitted)

    def __len__(self):
        return len(self.image_paths)


def make_caption(description: str, action_description: str) -> str:
    """The course caption: description + " " + action, or the description alone when the action is empty."""
    return f"{description} {action_description}" if action_description else description


def read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _captions_from_info(path: Path, info: dict) -> dict:
    captions = {}
    for key, entry in info.items():
        where = f"{path}: entry {key!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        descriptions = entry.get("given_description")
        if not isinstance(descriptions, list) or not descriptions:
            raise ValueError(f"{where}: field 'given_description' must be a non-empty list of strings")
        if not all(isinstance(d, str) and d.strip() for d in descriptions):
            raise ValueError(f"{where}: field 'given_description' holds an empty or non-string description")
        if "action_description" not in entry:
            raise ValueError(f"{where}: field 'action_description' is missing (use \"\" for none)")
        action = entry["action_description"]
        if not isinstance(action, str):
            raise ValueError(f"{where}: field 'action_description' must be a string, got {type(action).__name__}")
        captions[key] = [make_caption(d.strip(), action.strip()) for d in descriptions]
    return captions


def load_course_data(data_dir) -> CourseData:
    """Read a course-format folder (or a folder with `captions.json` = {image file: caption or [captions]})."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found (build the shapes set with `hw6 data shapes`)")
    problems = []
    if not (root / "train_info.json").exists() and (root / "captions.json").exists():
        mapping = read_json(root / "captions.json", "caption mapping")
        paths, keys, captions = [], [], {}
        for name, caption in mapping.items():
            options = [caption] if isinstance(caption, str) else caption
            if not isinstance(options, list) or not options or not all(isinstance(c, str) and c for c in options):
                raise ValueError(f"{root / 'captions.json'}: entry {name!r} must be a caption or a list of captions")
            if not (root / name).is_file():
                problems.append(f"{root / name}: image listed in captions.json is missing")
                continue
            paths.append(root / name)
            keys.append(name)
            captions[name] = options
        return _finish(CourseData(root, paths, keys, captions, problems))

    info_path = root / "train_info.json"
    captions = _captions_from_info(info_path, read_json(info_path, "train_info.json"))
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir}: folder of training images not found")
    paths, keys, bad_names, unknown = [], [], [], []
    for path in sorted(train_dir.iterdir()):
        match = IMAGE_NAME.match(path.name)
        if not match:
            bad_names.append(path.name)
            continue
        key = f"{match.group(1)}_{match.group(2)}"
        if key not in captions:
            unknown.append(path.name)
            continue
        paths.append(path)
        keys.append(key)
    if bad_names:
        problems.append(f"{train_dir}: skipped {len(bad_names)} file(s) not named <monsterID>_<ACTION>_<frame>.png,"
                        f" e.g. {bad_names[0]!r}")
    if unknown:
        problems.append(f"{train_dir}: skipped {len(unknown)} image(s) whose key is absent from train_info.json,"
                        f" e.g. {unknown[0]!r}")
    empty = sorted(set(captions) - set(keys))
    if empty:
        problems.append(f"{info_path}: {len(empty)} key(s) have no images, e.g. {empty[0]!r}")
    return _finish(CourseData(root, paths, keys, captions, problems))


def _finish(data: CourseData) -> CourseData:
    for problem in data.problems:
        warnings.warn(problem, stacklevel=3)
    if not data.image_paths:
        raise ValueError(f"{data.root}: no usable training images")
    return data


def count_too_long(tokenizer, texts: list, max_length: int) -> int:
    """How many texts the tokenizer makes longer than max_length tokens (they will be truncated)."""
    return sum(len(ids) > max_length for ids in tokenizer(list(texts)).input_ids) if texts else 0


def check_course_data(data_dir, tokenizer=None, max_text_len: int = 77, load_tokenizer=None) -> dict:
    """What `hw6 data check` prints: counts (monsters, keys, images, images per action family), every problem
    found while reading (each image is opened and checked: image_problem), and how many captions and test prompts
    are longer than the text encoder's limit. load_tokenizer, if given instead of tokenizer, is called only once
    the folder has been read (a bad folder fails first, before a hub tokenizer is looked for); if it cannot load
    one (OSError), the token count is reported as skipped."""
    root = Path(data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_course_data(root)
    families: dict = {}
    for key in data.image_keys:
        family = re.sub(r"\d+$", "", key.split("_", 1)[1])  # attack12 -> attack, die2 -> die
        families[family] = families.get(family, 0) + 1
    unreadable = [problem for problem in map(image_problem, data.image_paths) if problem]
    report = {"monsters": len({k.split("_", 1)[0] for k in data.captions}), "keys": len(data.captions),
              "images": len(data), "unreadable_images": len(unreadable),
              "images_per_action_family": dict(sorted(families.items())),
              "problems": [str(w.message) for w in caught] + unreadable}
    captions = sorted({c for options in data.captions.values() for c in options})
    prompts = [p for _, p, _ in load_test_prompts(root / "test.json")] if (root / "test.json").exists() else []
    report.update(captions=len(captions), test_prompts=len(prompts))
    if tokenizer is None and load_tokenizer is not None:
        try:
            tokenizer = load_tokenizer()
        except OSError as err:  # e.g. a hub tokenizer while offline: the rest of the report stands
            report["token_count"] = f"skipped: {err}"
    if tokenizer is not None:
        report.update(max_text_len=max_text_len, captions_truncated=count_too_long(tokenizer, captions, max_text_len),
                      test_prompts_truncated=count_too_long(tokenizer, prompts, max_text_len))
    return report


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be read, or None. A PNG's chunks are read and their checksums verified
    (Image.verify, without decoding the pixels: a truncated or damaged file fails); other formats are decoded."""
    if not path.is_file():
        return f"{path}: not a file"
    try:
        with Image.open(path) as img:
            if img.format == "PNG":
                img.verify()
            else:
                img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{path}: unreadable or corrupt image ({err})"
    return None


def load_test_prompts(path) -> list:
    """[(image_name, text_prompt, entry)] from a course test.json, validated."""
    path = Path(path)
    entries = read_json(path, "test.json")
    out, used_by = [], {}
    for key, entry in entries.items():
        where = f"{path}: entry {key!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        prompt, name = entry.get("text_prompt"), entry.get("image_name")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: field 'text_prompt' must be a non-empty string")
        if name is None:
            raise ValueError(f"{where}: field 'image_name' is missing (expected a file name ending in .png)")
        if not isinstance(name, str) or not name.endswith(".png") or Path(name).name != name or name.startswith("."):
            raise ValueError(f"{where}: field 'image_name' must be a plain file name ending in .png, got {name!r}")
        if name in used_by:
            raise ValueError(f"{where}: field 'image_name' {name!r} is already used by entry {used_by[name]!r}; "
                             "each image needs its own name")
        used_by[name] = key
        out.append((name, prompt, entry))
    if not out:
        raise ValueError(f"{path}: no entries (expected objects with 'text_prompt' and 'image_name')")
    return out


def write_json_atomic(path, data) -> None:
    """Write JSON through a temporary file and one rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def free_timestamped_path(base) -> Path:
    """`<base>_<YYYYmmdd-HHMMSS>`, with '_' added until no such file or folder exists (where earlier outputs go
    aside instead of being overwritten)."""
    path = Path(f"{base}_{time.strftime('%Y%m%d-%H%M%S')}")
    while path.exists():
        path = path.with_name(path.name + "_")
    return path


def ensure_writable_dir(path) -> Path:
    """Create the folder if needed and prove it is writable, failing early with a one-line reason."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"  # one per process: torchrun ranks probe at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{path}: output folder is not writable ({err.strerror or err})") from None
    return path


# ----------------------------------------------------------------------------------------------- images
def load_image(path, size: int, prep: str = "stretch") -> torch.Tensor:
    """One image as a (3, size, size) float tensor in [-1, 1]; transparency goes over white.

    prep: 'stretch' resizes the whole image to a square (the course's way); 'center' first crops a square
    around the non-white pixels, padded with white, so the sprite fills the frame whatever its native size.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: scale to 8 bits (convert would clip)
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA", "P") or "transparency" in img.info:
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            img = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: unreadable or corrupt image ({err})") from None
    if prep == "center":
        img = center_on_content(img)
    elif prep != "stretch":
        raise ValueError(f"image_prep must be 'stretch' or 'center', got {prep!r}")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def center_on_content(img: Image.Image, white: int = 245) -> Image.Image:
    """The smallest square around the pixels darker than `white`, centred, padded with white."""
    mask = (np.asarray(img) < white).any(axis=2)
    if not mask.any():
        return img
    ys, xs = np.nonzero(mask)
    left, top, right, bottom = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    side = max(right - left, bottom - top)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img.crop((left, top, right, bottom)), ((side - (right - left)) // 2, (side - (bottom - top)) // 2))
    return square


_SIDE = re.compile(r"\b(left|right)(most|wards?)?\b", re.IGNORECASE)


def mirror_caption(caption: str) -> str:
    """The caption of the horizontally flipped image: left and right trade places ("in the top-left corner" ->
    "in the top-right corner", "Left" -> "Right"); a caption that names no side comes back unchanged."""
    def swap(match):
        word = match.group(1)
        other = {"left": "right", "right": "left"}[word.lower()]
        other = other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
        return other + (match.group(2) or "")
    return _SIDE.sub(swap, caption)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """(image in [-1, 1], caption) pairs; the caption is drawn afresh among the key's options each time."""

    def __init__(self, data: CourseData, image_size: int, flip: bool = False, seed: int = 0, prep: str = "stretch"):
        self.data, self.image_size, self.flip, self.prep, self.seed = data, image_size, flip, prep, seed
        self.epoch = 0  # set by the training loop; with the seed and the index it fixes the flip and the caption

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        # a generator per (seed, epoch, index): the same draws in any DataLoader worker, and again after a resume
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        for tried in range(len(self)):  # a corrupt file (found only now when nothing is cached): use the next one
            try:
                image = load_image(self.data.image_paths[index], self.image_size, self.prep)
                break
            except ValueError as err:
                warnings.warn(f"{err}; the next image is used in its place", stacklevel=2)
                index = (index + 1) % len(self)
        else:
            raise ValueError(f"{self.data.root}: every training image is unreadable")
        flipped = self.flip and rng.random() < 0.5
        caption = rng.choice(self.data.captions[self.data.image_keys[index]])
        if flipped:  # the mirrored image, described with left and right swapped
            image, caption = image.flip(-1), mirror_caption(caption)
        return image, caption


def load_images(data: CourseData, image_size: int, prep: str = "stretch") -> torch.Tensor:
    """All training images as one (N, 3, H, W) tensor; corrupt files are skipped with one warning each."""
    images, keep = [], []
    for i, path in enumerate(data.image_paths):
        try:
            images.append(load_image(path, image_size, prep))
            keep.append(i)
        except ValueError as err:
            warnings.warn(f"{err}; skipped", stacklevel=2)
    if not images:
        raise ValueError(f"{data.root}: every training image is unreadable")
    if len(keep) < len(data.image_paths):
        data.image_paths = [data.image_paths[i] for i in keep]
        data.image_keys = [data.image_keys[i] for i in keep]
    return torch.stack(images)


# ----------------------------------------------------------------------------------------------- shapes set
# Six hues spread around the colour wheel, so that no two are easily confused.
COLOURS = {
    "red": (215, 40, 40), "yellow": (235, 200, 30), "green": (40, 160, 60),
    "cyan": (30, 180, 200), "blue": (40, 70, 210), "purple": (140, 50, 180),
}
COLOUR_SYNONYMS = {"red": "scarlet", "yellow": "golden", "green": "emerald", "cyan": "turquoise",
                   "blue": "cobalt", "purple": "violet"}
SHAPES = ("circle", "square", "triangle", "star")
SHAPE_NOUNS = {"circle": ("circle", "disc", "round blob"), "square": ("square", "box", "square tile"),
               "triangle": ("triangle", "three-sided shape", "triangular tile"),
               "star": ("star", "five-pointed star", "star shape")}
# Colour-shape pairs never seen in training: test.json asks for them (composition).
HELD_OUT = (("red", "star"), ("green", "circle"), ("blue", "triangle"), ("purple", "square"))
SIZES = {"small": 0.15, "big": 0.27}          # radius as a fraction of the image side
PLACES = {"topleft": ("top left corner", 0.27, 0.27), "topright": ("top right corner", 0.73, 0.27),
          "center": ("middle", 0.5, 0.5), "bottomleft": ("bottom left corner", 0.27, 0.73),
          "bottomright": ("bottom right corner", 0.73, 0.73)}
PLAIN_PROMPTS = ("Draw a {c} {s}.", "A picture of one {c} {s}, nothing else.", "{C} {s}.")  # unseen phrasings
# How training captions say size and place: several words and sentences for each, so that a model learns what
# they mean rather than one fixed string (4 templates x 2 size words x 5 place phrases = 40 phrasings per corner
# action, 24 for the middle). "High up" and "low down" give the corners a second pair of vertical words: MiniLM
# puts the unseen "lower" nearer "low" than "high" (cosine 0.63 against 0.36) more clearly than nearer "bottom"
# than "top" (0.48 against 0.32). "Up in"/"down in" (MORE_PLACE_WORDS) give them a third: with two pairs, one
# training seed in three still read the unseen "upper" or "lower" upside down (README, "The demo's recipe").
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
PLACE_WORDS = {"topleft": ("in the top left corner", "in the top left", "in the top-left corner",
                           "high up on the left"),
               "topright": ("in the top right corner", "in the top right", "in the top-right corner",
                            "high up on the right"),
               "center": ("in the middle", "in the centre", "in the center"),
               "bottomleft": ("in the bottom left corner", "in the bottom left", "in the bottom-left corner",
                              "low down on the left"),
               "bottomright": ("in the bottom right corner", "in the bottom right", "in the bottom-right corner",
                               "low down on the right")}
# Training captions only: the fixed prompt set's training-style prompts keep to PLACE_WORDS, so that the prompt set
# (and the shipped reference's figures on it) stays as it was when these were added.
MORE_PLACE_WORDS = {"topleft": ("up in the left corner",), "topright": ("up in the right corner",), "center": (),
                    "bottomleft": ("down in the left corner",), "bottomright": ("down in the right corner",)}
ACTION_TEMPLATES = ("It is {size} and sits {place}.", "It is {size}, {place}.",
                    "A {size} one, {place} of the picture.", "{Size}, placed {place}.")
# Only in the fixed prompt set, never in a training caption: how well size and place carry over to a user's words.
UNSEEN_SIZE_WORDS = {"small": ("tiny",), "big": ("huge",)}
UNSEEN_PLACE_WORDS = {"topleft": ("near the top left", "in the upper left"),
                      "topright": ("near the top right", "in the upper right"),
                      "center": ("centred", "in the very middle"),
                      "bottomleft": ("at the bottom left", "in the lower left"),
                      "bottomright": ("at the bottom right", "in the lower right")}
UNSEEN_PLACED_PROMPTS = ("Draw a {size} {c} {s} {place}.", "A {size} {c} {s}, {place}.",
                         "Show one {size} {c} {s} {place}, nothing else.")
# The fixed prompt set in rounds of one prompt per pair: training-style captions (size and place), unseen
# phrasings of colour and shape alone ("plain"), unseen phrasings that also give size and place ("placed").
TEST_ROUNDS = ("seen", "plain", "placed", "seen", "plain", "placed", "placed")


def shape_pairs(held_out: bool | None = None) -> list:
    """All (colour, shape) pairs; held_out=True/False keeps only held-out/training pairs."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if held_out is None:
        return pairs
    return [p for p in pairs if (p in HELD_OUT) == held_out]


def shape_descriptions(colour: str, shape: str) -> list:
    """The three given descriptions of one object, as in the course's train_info.json."""
    nouns = SHAPE_NOUNS[shape]
    return [f"A {colour} {nouns[0]}.", f"A {nouns[1]} coloured {colour}.",
            f"A {COLOUR_SYNONYMS[colour]} ({colour}) {nouns[2]} on a white background."]


def action_descriptions(size: str, place: str, prompt_set: bool = False) -> list:
    """Every training phrasing of one size and place (ACTION_TEMPLATES x SIZE_WORDS x PLACE_WORDS and
    MORE_PLACE_WORDS); prompt_set=True: those of the fixed prompt set's training-style prompts (PLACE_WORDS only)."""
    places = PLACE_WORDS[place] + (() if prompt_set else MORE_PLACE_WORDS[place])
    return [template.format(size=word, Size=word.capitalize(), place=where) for template in ACTION_TEMPLATES
            for word in SIZE_WORDS[size] for where in places]


def action_description(size: str, place: str, rng: random.Random, prompt_set: bool = False) -> str:
    """The action description of one shapes-set key: a training phrasing of its size and place, drawn by rng."""
    return rng.choice(action_descriptions(size, place, prompt_set))


def shapes_actions(seed: int = 0) -> dict:
    """Each shapes-set key ("3_smalltopleft": object 3, small, top left) -> its action description, drawn by a
    generator of its own (so the phrasing leaves the images as they are)."""
    return {f"{i}_{size}{place}": action_description(size, place, random.Random(f"{seed}-{i}_{size}{place}"))
            for i, _ in enumerate(shape_pairs(held_out=False)) for size in SIZES for place in PLACES}


def unseen_placed_prompt(colour: str, shape: str, size: str, place: str, rng: random.Random) -> str:
    """A prompt for all four attributes in words no training caption uses ("Draw a tiny red star at the bottom
    left."); the size word may be a training one or an unseen one, the place phrase is always unseen."""
    size_word = rng.choice(SIZE_WORDS[size] + UNSEEN_SIZE_WORDS[size])
    return rng.choice(UNSEEN_PLACED_PROMPTS).format(size=size_word, c=colour, s=shape,
                                                    place=rng.choice(UNSEEN_PLACE_WORDS[place]))


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list:
    """Vertices of a square, triangle or star centred at (cx, cy); angle in radians."""
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r = radius * 0.85
        pts = [(x * r, y * r) for x, y in corners]
    elif shape == "triangle":
        pts = [(radius * math.cos(a), radius * math.sin(a) + radius * 0.15)
               for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # five-pointed star, inner radius 0.45
        pts = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in pts]


def render_shape(colour: str, shape: str, size: str, place: str, rng: random.Random, image_size: int = 64):
    """One jittered frame: the shape in its colour on white, drawn 4x larger then downsampled (antialiasing)."""
    scale = 4
    side = image_size * scale
    img = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    _, fx, fy = PLACES[place]
    cx = (fx + rng.uniform(-0.05, 0.05)) * side
    cy = (fy + rng.uniform(-0.05, 0.05)) * side
    radius = SIZES[size] * side * rng.uniform(0.9, 1.1)
    fill = tuple(int(np.clip(v + rng.randint(-12, 12), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        max_angle = {"square": 0.0, "triangle": 8.0, "star": 12.0}[shape]
        angle = math.radians(rng.uniform(-max_angle, max_angle))
        draw.polygon(shape_polygon(shape, cx, cy, radius, angle), fill=fill)
    return img.resize((image_size, image_size), Image.LANCZOS)


def build_shapes_dataset(out_dir, frames: int = 50, seed: int = 0, image_size: int = 64) -> Path:
    """Write the coloured-shapes set in the course format; deterministic for a seed. Returns out_dir.

    Objects ("monsters") are the training colour-shape pairs; actions are size x place; each key has
    `frames` jittered renders; each key's action description is one of several phrasings of its size and place,
    drawn by a generator of its own (so the phrasing leaves the images as they are). test.json is the fixed
    prompt set (shape_test_entries), with the fields the automatic check scores.
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1; got {frames}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels; got {image_size}")
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    info, actions = {}, shapes_actions(seed)
    for monster_id, (colour, shape) in enumerate(shape_pairs(held_out=False)):
        for size in SIZES:
            for place in PLACES:
                key = f"{monster_id}_{size}{place}"
                info[key] = {"original_name": f"{colour} {shape}", "given_description": shape_descriptions(colour, shape),
                             "action_description": actions[key], "num_frames": frames}
                for frame in range(frames):
                    render_shape(colour, shape, size, place, rng, image_size).save(out / "train" / f"{key}_{frame}.png")
    (out / "train_info.json").write_text(json.dumps(info, indent=1))
    (out / "test.json").write_text(json.dumps(shape_test_entries(seed), indent=1))
    return out


def shape_test_entries(seed: int = 0) -> dict:
    """The fixed prompt set (168 prompts), deterministic for a seed; one entry per prompt, as in test.json.

    For each of the 24 colour-shape pairs (4 held out of training): two training-style captions (description and
    action description: size and place), two unseen phrasings of colour and shape alone, and three unseen
    phrasings that also give size and place. Each entry says the colour, shape, size and place it asks for (None:
    not asked, so not scored), whether the pair is held out, and its phrasing ('seen' or 'unseen'). The prompts
    come in rounds over all pairs (TEST_ROUNDS), so any first N covers the pairs evenly, and the sizes and places
    of each phrasing are dealt from shuffled decks of all 10 combinations.
    """
    rng = random.Random(seed + 1)
    pairs = shape_pairs()
    combinations = [(size, place) for size in SIZES for place in PLACES]
    plain_templates = {pair: rng.sample(PLAIN_PROMPTS, TEST_ROUNDS.count("plain")) for pair in pairs}
    decks = {"seen": [], "placed": []}
    entries, used = {}, set()
    for kind in TEST_ROUNDS:
        for colour, shape in pairs:
            size = place = None
            if kind == "plain":
                prompt = plain_templates[(colour, shape)].pop().format(c=colour, C=colour.capitalize(), s=shape)
            else:
                if not decks[kind]:
                    decks[kind] = rng.sample(combinations, len(combinations))
                size, place = decks[kind].pop()
                prompt = None
                while prompt is None or prompt in used:  # a pair dealt the same size and place twice: new words
                    if kind == "seen":
                        prompt = make_caption(rng.choice(shape_descriptions(colour, shape)),
                                              action_description(size, place, rng, prompt_set=True))
                    else:
                        prompt = unseen_placed_prompt(colour, shape, size, place, rng)
            used.add(prompt)
            index = len(entries)
            entries[str(index)] = {"text_prompt": prompt, "image_name": f"{index:03d}.png", "colour": colour,
                                   "shape": shape, "size": size, "place": place, "held_out": (colour, shape) in HELD_OUT,
                                   "phrasing": "seen" if kind == "seen" else "unseen"}
    return entries


def ensure_data(cfg) -> Path:
    """The config's data folder; the embedded shapes set (a data_dir named 'shapes') is built on first use."""
    if Path(cfg.data.data_dir).name == "shapes":
        return ensure_shapes_dataset(cfg.data.data_dir, cfg.data.shapes_frames, cfg.data.data_seed, cfg.data.image_size)
    return Path(cfg.data.data_dir)


def ensure_shapes_dataset(data_dir, frames: int = 50, seed: int = 0, image_size: int = 64) -> Path:
    """Build the shapes set on first use; one built by an older version of the builder (its test.json is not
    today's prompt set, or its action descriptions not today's) is built again in place (the images come out the
    same; the captions and prompts change)."""
    root = Path(data_dir)
    if not (root / "train_info.json").exists():
        print(f"building the shapes set in {root} ({len(shape_pairs(False)) * 10 * frames} images)...")
        build_shapes_dataset(root, frames=frames, seed=seed, image_size=image_size)
    elif is_shapes_set(root) and not is_current_shapes_set(root, seed):
        print(f"the shapes set in {root} was built by an earlier version (other captions and prompts): building it again")
        build_shapes_dataset(root, frames=frames, seed=seed, image_size=image_size)
    return root


def is_current_shapes_set(root: Path, seed: int) -> bool:
    """Whether a shapes set has today's prompt set (test.json) and action descriptions (train_info.json)."""
    info = read_json(root / "train_info.json", "train_info.json")
    actions = {key: entry.get("action_description") if isinstance(entry, dict) else None for key, entry in info.items()}
    return actions == shapes_actions(seed) and read_json(root / "test.json", "test.json") == shape_test_entries(seed)


def is_shapes_set(root: Path) -> bool:
    """Whether a course-format folder is a shapes set (its test.json entries name a colour and a shape)."""
    try:
        entries = json.loads((root / "test.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(entries, dict) and bool(entries) and all(
        isinstance(e, dict) and "colour" in e and "shape" in e for e in entries.values())


# ----------------------------------------------------------------------------------------------- emoji set
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian's fonts-noto-color-emoji


def build_emoji_dataset(out_dir, image_size: int = 64, limit: int = 0, font_path: str | None = None) -> Path:
    """Render every fully-qualified emoji the font has to a PNG, captioned with its CLDR name, in the course format.

    Each emoji is one "monster" with the single action `main` (empty action description, as the course's `main`
    keys have) and frame 0. The font holds one 109-pixel colour strike, drawn with embedded_color=True.
    """
    import emoji
    from PIL import ImageFont

    font_path = Path(font_path or EMOJI_FONT)
    if not font_path.is_file():
        raise FileNotFoundError(f"{font_path}: emoji font not found (install Debian's fonts-noto-color-emoji)")
    font = ImageFont.truetype(str(font_path), 109)
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    info = {}
    qualified = [e for e, meta in emoji.EMOJI_DATA.items() if meta.get("status") == emoji.STATUS["fully_qualified"]]
    for char in qualified:
        canvas = Image.new("RGBA", (136, 128), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
        box = canvas.getbbox()
        if box is None:  # the font has no glyph for this sequence
            continue
        glyph = canvas.crop(box)
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        key = f"{len(info)}_main"
        square.convert("RGB").resize((image_size, image_size), Image.LANCZOS).save(out / "train" / f"{key}_0.png")
        name = emoji.EMOJI_DATA[char]["en"].strip(":").replace("_", " ")
        info[key] = {"original_name": name, "given_description": [f"{name} emoji", f"An emoji of {name}.", name],
                     "action_description": "", "num_frames": 1}
        if limit and len(info) >= limit:
            break
    (out / "train_info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
    tests = {str(i): {"text_prompt": entry["given_description"][1], "image_name": f"{key}.png"}
             for i, (key, entry) in enumerate(list(info.items())[:: max(len(info) // 64, 1)])}
    (out / "test.json").write_text(json.dumps(tests, indent=1))
    return out
