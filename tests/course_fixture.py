"""A small course folder in exactly the real schema (see ../shared/NOTES.md): several monsters, every action
family, numbered actions, an empty `main` action description, a key with num_frames 0, a gap in frame numbers,
sprite-like PNGs of different sizes (some RGBA, some palette) on white, and a test.json of unseen monsters."""
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

ACTIONS = ["main", "stand", "move", "jump", "attack1", "attack12", "skill3", "die", "die2", "hit", "hit1"]
ACTION_TEXT = {"main": "", "stand": "The monster is standing.", "move": "The monster is moving.",
               "jump": "The monster is jumping.", "attack": "The monster is attacking.", "skill": "The monster is using a skill.",
               "die": "The monster is dying.", "hit": "The monster is being hit."}
COLOURS = [(200, 60, 60), (60, 160, 80), (70, 90, 200), (150, 90, 40)]


def sprite(rng: random.Random, colour, mode: str) -> Image.Image:
    width, height = rng.randint(40, 120), rng.randint(40, 120)
    img = Image.new("RGBA" if mode == "RGBA" else "RGB", (width, height), (255, 255, 255, 0 if mode == "RGBA" else 255))
    draw = ImageDraw.Draw(img)
    draw.ellipse([width * 0.2, height * 0.2, width * 0.8, height * 0.9], fill=colour + (255,) if mode == "RGBA" else colour)
    draw.rectangle([width * 0.4, height * 0.05, width * 0.6, height * 0.3], fill=(30, 30, 30))
    return img.convert("P") if mode == "P" else img


def write_course_fixture(root, monsters: int = 4, seed: int = 0) -> Path:
    root = Path(root)
    (root / "train").mkdir(parents=True)
    rng = random.Random(seed)
    info = {}
    for monster in range(monsters):
        descriptions = [f"A {['red', 'green', 'blue', 'brown'][monster % 4]} blob monster with a dark hat, number {monster}.",
                        f"Round creature {monster} with a small black hat.", f"Monster {monster}: a hatted ball."]
        for action in ACTIONS:
            key = f"{monster}_{action}"
            family = action.rstrip("0123456789")
            frames = [0, 1, 3] if action == "move" else [0, 1]  # frame 2 of 'move' is missing: a gap
            if monster == 0 and action == "skill3":
                frames = []                                        # a key with no images (num_frames 0)
            info[key] = {"original_name": f"Monster{monster}", "given_description": descriptions,
                         "action_description": ACTION_TEXT[family], "num_frames": len(frames)}
            for frame in frames:
                mode = rng.choice(["RGB", "RGBA", "P"])
                sprite(rng, COLOURS[monster % 4], mode).save(root / "train" / f"{key}_{frame}.png")
    (root / "train_info.json").write_text(json.dumps(info, indent=1))
    tests = {}
    for i, action in enumerate(["main", "attack", "die", "move"]):
        description = f"A purple spiky monster number {100 + i} with long arms."
        tests[str(i)] = {"image_name": f"{i}_{action}.png", "given_description": description,
                         "action_description": ACTION_TEXT[action], "text_prompt": f"{description} {ACTION_TEXT[action]}".strip()}
    (root / "test.json").write_text(json.dumps(tests, indent=1))
    return root
