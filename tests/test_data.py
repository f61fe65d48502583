import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from hw6utils.data import (HELD_OUT, MORE_PLACE_WORDS, PLACE_WORDS, PLACES, SIZE_WORDS, SIZES, UNSEEN_PLACE_WORDS,
                           UNSEEN_SIZE_WORDS, ImageCaptionDataset, action_descriptions, build_shapes_dataset,
                           load_course_data, load_image, load_test_prompts, make_caption, mirror_caption,
                           shape_descriptions, shape_pairs, shape_test_entries)


def write_course(root, info, images):
    (root / "train").mkdir(parents=True)
    (root / "train_info.json").write_text(json.dumps(info))
    for name in images:
        Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "train" / name)
    return root


ENTRY = {"original_name": "x", "given_description": ["Gray vulture monster with wings."],
         "action_description": "The monster is being hit.", "num_frames": 1}


def test_shapes_set_is_in_the_course_format(shapes_dir):
    info = json.loads((shapes_dir / "train_info.json").read_text())
    assert len(info) == len(shape_pairs(held_out=False)) * 10
    key, entry = next(iter(info.items()))
    assert set(entry) == {"original_name", "given_description", "action_description", "num_frames"}
    assert len(entry["given_description"]) == 3
    assert (shapes_dir / "train" / f"{key}_0.png").is_file()
    names = {e["original_name"] for e in info.values()}
    assert not any(f"{c} {s}" in names for c, s in HELD_OUT)  # held-out pairs never appear in training
    tests = load_test_prompts(shapes_dir / "test.json")
    assert [e for _, _, e in tests] == list(shape_test_entries(0).values())


def test_the_fixed_prompt_set_says_what_each_prompt_asks_for():
    entries = list(shape_test_entries(0).values())
    assert len(entries) >= 150 and len({e["text_prompt"] for e in entries}) == len(entries)
    assert sum(e["held_out"] for e in entries) == len(entries) * len(HELD_OUT) // len(shape_pairs())
    allowed = {"size": set(SIZES), "place": set(PLACES)}
    for entry in entries:
        assert entry["held_out"] == ((entry["colour"], entry["shape"]) in HELD_OUT)
        assert entry["size"] in allowed["size"] | {None} and entry["place"] in allowed["place"] | {None}
        assert (entry["size"] is None) == (entry["place"] is None)
        assert entry["phrasing"] in ("seen", "unseen")
    for phrasing in ("seen", "unseen"):  # every size x place, in training-style and in unseen phrasings
        asked = {(e["size"], e["place"]) for e in entries if e["phrasing"] == phrasing and e["size"]}
        assert asked == {(size, place) for size in SIZES for place in PLACES}, phrasing
    assert sum(e["size"] is None for e in entries) >= 24  # colour and shape alone, as before
    first = entries[:48]                                    # any first N (eval_limit) is spread over all pairs
    assert {(e["colour"], e["shape"]) for e in first} == set(shape_pairs())


def phrase_in(phrase: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(phrase.lower())}\b", text.lower()) is not None


def test_each_prompt_names_the_size_and_place_it_asks_for_and_no_other():
    size_words = {size: SIZE_WORDS[size] + UNSEEN_SIZE_WORDS[size] for size in SIZES}
    place_words = {place: PLACE_WORDS[place] + UNSEEN_PLACE_WORDS[place] for place in PLACES}
    for entry in shape_test_entries(0).values():
        prompt = entry["text_prompt"]
        for size, words in size_words.items():
            assert any(phrase_in(w, prompt) for w in words) == (size == entry["size"]), prompt
        for place, words in place_words.items():
            assert any(phrase_in(w, prompt) for w in words) == (place == entry["place"]), prompt
        if entry["phrasing"] == "seen":
            options = [make_caption(d, a) for d in shape_descriptions(entry["colour"], entry["shape"])
                       for a in action_descriptions(entry["size"], entry["place"], prompt_set=True)]
            assert prompt in options  # the prompt set keeps to PLACE_WORDS (MORE_PLACE_WORDS: captions only)


def test_the_fixed_prompt_set_is_fixed_by_its_seed():
    assert shape_test_entries(3) == shape_test_entries(3)
    assert [e["text_prompt"] for e in shape_test_entries(3).values()] != \
        [e["text_prompt"] for e in shape_test_entries(4).values()]


def test_training_captions_say_size_and_place_in_several_ways(shapes_dir):
    info = json.loads((shapes_dir / "train_info.json").read_text())
    by_action: dict = {}
    for key, entry in info.items():
        action = key.split("_", 1)[1]                       # e.g. bigtopleft
        size = next(s for s in SIZES if action.startswith(s))
        place = action[len(size):]
        assert entry["action_description"] in action_descriptions(size, place), key
        by_action.setdefault((size, place), set()).add(entry["action_description"])
    assert all(len(phrasings) >= 5 for phrasings in by_action.values()), by_action
    used = " ".join(" ".join(phrasings) for phrasings in by_action.values())
    words = [*SIZE_WORDS.values(), *PLACE_WORDS.values(), *MORE_PLACE_WORDS.values()]
    for word in [w for group in words for w in group]:
        assert phrase_in(word, used), word                  # each training word shows up somewhere
    again = build_shapes_dataset(shapes_dir.parent / "again", frames=1, seed=0)
    assert json.loads((again / "train_info.json").read_text()) == info


def test_unseen_phrasings_never_occur_in_training_captions(shapes_dir):
    data = load_course_data(shapes_dir)
    captions = sorted({c for options in data.captions.values() for c in options})
    for words in [*UNSEEN_SIZE_WORDS.values(), *UNSEEN_PLACE_WORDS.values()]:
        for word in words:
            assert not any(phrase_in(word, caption) for caption in captions), word
    unseen = [e["text_prompt"] for e in shape_test_entries(0).values() if e["phrasing"] == "unseen"]
    assert not set(unseen) & set(captions)
    everything = {make_caption(d, a) for c, s in shape_pairs() for d in shape_descriptions(c, s)
                  for size in SIZES for place in PLACES for a in action_descriptions(size, place)}
    assert not set(unseen) & everything                     # nor any caption the templates could make


def test_caption_is_description_space_action_or_description_alone():
    assert make_caption("A red circle.", "It is small.") == "A red circle. It is small."
    assert make_caption("A red circle.", "") == "A red circle."


def test_loader_reads_keys_with_digits_and_warns_about_orphans(tmp_path):
    info = {"3_attack12": ENTRY, "3_main": {**ENTRY, "action_description": ""}, "4_die2": ENTRY}
    root = write_course(tmp_path / "d", info, ["3_attack12_0.png", "3_attack12_4.png", "3_main_0.png",
                                               "9_jump_0.png", "notes.png"])
    with pytest.warns(UserWarning) as caught:
        data = load_course_data(root)
    messages = " ".join(str(w.message) for w in caught)
    assert "1 file(s) not named" in messages and "1 image(s) whose key is absent" in messages
    assert "1 key(s) have no images, e.g. '4_die2'" in messages
    assert len(data) == 3 and data.captions["3_main"] == ["Gray vulture monster with wings."]
    assert data.captions["3_attack12"] == ["Gray vulture monster with wings. The monster is being hit."]


def test_monster_ids_with_letters_or_underscores_and_upper_case_png(tmp_path):
    info = {"m_1_main": {**ENTRY, "action_description": ""}, "abc_move": ENTRY}
    root = write_course(tmp_path / "d", info, ["m_1_main_0.png", "abc_move_12.PNG"])
    data = load_course_data(root)
    assert sorted(data.image_keys) == ["abc_move", "m_1_main"]


@pytest.mark.parametrize("entry, message", [
    ({"action_description": ""}, "field 'given_description' must be a non-empty list"),
    ({"given_description": [], "action_description": ""}, "field 'given_description' must be a non-empty list"),
    ({"given_description": [""], "action_description": ""}, "empty or non-string description"),
    ({"given_description": ["a"]}, "field 'action_description' is missing"),
    ("text", "expected an object"),
])
def test_bad_train_info_entries_name_file_key_and_field(tmp_path, entry, message):
    root = write_course(tmp_path / "d", {"1_main": entry}, [])
    with pytest.raises(ValueError, match=message) as err:
        load_course_data(root)
    assert "train_info.json: entry '1_main'" in str(err.value)


def test_wrong_json_shape_and_missing_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train_info.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object at the top level, got list"):
        load_course_data(tmp_path / "d")
    (tmp_path / "d" / "train_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_course_data(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        load_course_data(tmp_path / "missing")


def test_test_json_validation(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"0": {"text_prompt": "A red circle.", "image_name": "0_main.png"}}))
    assert load_test_prompts(path)[0][:2] == ("0_main.png", "A red circle.")
    for entry, field in [({"image_name": "a.png"}, "text_prompt"), ({"text_prompt": "x", "image_name": "../a.png"}, "image_name"),
                         ({"text_prompt": "x", "image_name": "a.jpg"}, "image_name"), ({"text_prompt": "", "image_name": "a.png"}, "text_prompt")]:
        path.write_text(json.dumps({"7": entry}))
        with pytest.raises(ValueError, match=f"entry '7': field '{field}'"):
            load_test_prompts(path)
    path.write_text(json.dumps({"0": {"text_prompt": "a", "image_name": "x.png"},
                                "1": {"text_prompt": "b", "image_name": "x.png"}}))
    with pytest.raises(ValueError, match="entry '1': field 'image_name' 'x.png' is already used by entry '0'"):
        load_test_prompts(path)


def test_images_are_converted_resized_and_scaled(tmp_path):
    rgba = Image.new("RGBA", (10, 20), (0, 0, 0, 0))  # fully transparent -> white
    rgba.save(tmp_path / "a.png")
    Image.new("L", (8, 8), 0).save(tmp_path / "g.png")
    Image.new("P", (8, 8), 0).save(tmp_path / "p.png")
    white = load_image(tmp_path / "a.png", 16)
    assert white.shape == (3, 16, 16) and torch.allclose(white, torch.ones_like(white))
    assert load_image(tmp_path / "g.png", 16).min() == -1.0
    assert load_image(tmp_path / "p.png", 16).shape == (3, 16, 16)
    import numpy as np
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(tmp_path / "g16.png")  # 16-bit grey: 46% grey
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    grey = load_image(tmp_path / "g16.png", 8)
    assert torch.allclose(grey, torch.full_like(grey, round(30000 / 257) / 127.5 - 1))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="bad.png: unreadable or corrupt image"):
        load_image(tmp_path / "bad.png", 16)


def test_dataset_draws_captions_afresh(shapes_dir):
    data = load_course_data(shapes_dir)
    dataset = ImageCaptionDataset(data, 32, seed=0)
    assert dataset[0][1] == dataset[0][1]  # fixed within an epoch (so a resumed run sees the same batches)
    captions = set()
    for epoch in range(30):
        dataset.epoch = epoch
        captions.add(dataset[0][1])
    assert captions == set(data.captions[data.image_keys[0]])
    image, _ = dataset[0]
    assert image.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1



def test_mirror_caption_swaps_left_and_right():
    assert mirror_caption("A red circle. Big, placed in the top-left corner.") == \
        "A red circle. Big, placed in the top-right corner."
    assert mirror_caption("Right, then LEFT; the leftmost one moves rightwards.") == \
        "Left, then RIGHT; the rightmost one moves leftwards."
    for unchanged in ("A bright star in the middle.", "copyright", "A lefty."):
        assert mirror_caption(unchanged) == unchanged
    caption = "It is small and sits in the bottom right corner."
    assert mirror_caption(mirror_caption(caption)) == caption


def test_a_flipped_image_gets_the_mirrored_caption(shapes_dir):
    data = load_course_data(shapes_dir)
    index = data.image_keys.index("0_bigbottomleft")
    original = load_image(data.image_paths[index], 32)
    dataset = ImageCaptionDataset(data, 32, flip=True, seed=0)
    seen = set()
    for epoch in range(20):
        dataset.epoch = epoch
        image, caption = dataset[index]
        if torch.equal(image, original):
            assert caption in data.captions["0_bigbottomleft"]
            seen.add("as is")
        else:
            assert torch.equal(image, original.flip(-1))
            assert "right" in caption and "left" not in caption  # "bottom left" or "low down on the left" mirrored
            assert caption in map(mirror_caption, data.captions["0_bigbottomleft"])
            seen.add("flipped")
    assert seen == {"as is", "flipped"}


def test_uncached_dataset_uses_the_next_image_in_place_of_a_corrupt_one(shapes_dir, tmp_path):
    import shutil
    root = tmp_path / "shapes"
    shutil.copytree(shapes_dir, root)
    data = load_course_data(root)
    dataset = ImageCaptionDataset(data, 32)
    data.image_paths[0].write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="unreadable or corrupt image.*the next image is used in its place"):
        image, caption = dataset[0]
    assert torch.equal(image, dataset[1][0]) and caption in data.captions[data.image_keys[1]]
    for path in data.image_paths:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="every training image is unreadable"), pytest.warns(UserWarning):
        dataset[0]


def test_emoji_builder_writes_the_course_format(tmp_path):
    from hw6utils.data import EMOJI_FONT, build_emoji_dataset
    if not Path(EMOJI_FONT).is_file():
        pytest.skip(f"{EMOJI_FONT} is not installed (Debian package fonts-noto-color-emoji)")
    root = build_emoji_dataset(tmp_path / "emoji", image_size=32, limit=5)
    data = load_course_data(root)
    assert len(data) == 5 and all(k.endswith("_main") for k in data.image_keys)
    first = data.captions[data.image_keys[0]]
    assert first[0].endswith(" emoji") and "_" not in first[0]
    image = Image.open(data.image_paths[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    assert len(load_test_prompts(root / "test.json")) >= 1


def test_emoji_builder_names_a_missing_font(tmp_path):
    from hw6utils.data import build_emoji_dataset
    with pytest.raises(FileNotFoundError, match="nofont.ttf: emoji font not found"):
        build_emoji_dataset(tmp_path / "e", font_path=str(tmp_path / "nofont.ttf"))


def test_a_plain_caption_mapping_is_accepted(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "a.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "b.png")
    (root / "captions.json").write_text(json.dumps({"a.png": "A blue tile.", "b.png": ["A red tile.", "Red."]}))
    data = load_course_data(root)
    assert len(data) == 2 and data.captions["b.png"] == ["A red tile.", "Red."]


def test_center_prep_crops_a_square_around_the_sprite(tmp_path):
    img = Image.new("RGB", (100, 60), (255, 255, 255))
    img.paste(Image.new("RGB", (10, 20), (0, 0, 0)), (70, 30))  # a 10x20 black sprite off to the side
    img.save(tmp_path / "s.png")
    centred = load_image(tmp_path / "s.png", 20, prep="center")
    dark = (centred < 0).all(dim=0)
    assert dark[:, 5:15].all() and not dark[:, :4].any() and not dark[:, 16:].any()  # centred, full height
    stretched = load_image(tmp_path / "s.png", 20, prep="stretch")
    assert not (stretched < 0).all(dim=0)[:, 5:10].any()  # stretch keeps the sprite where it was
    with pytest.raises(ValueError, match="image_prep must be 'stretch' or 'center', got 'zoom'"):
        load_image(tmp_path / "s.png", 20, prep="zoom")


def test_a_shapes_set_built_by_an_earlier_version_is_built_again(tmp_path, capsys):
    import json

    from hw6utils.data import build_shapes_dataset, ensure_shapes_dataset, shape_test_entries
    root = build_shapes_dataset(tmp_path / "shapes", frames=1, seed=0)
    old = {k: {f: v for f, v in e.items() if f not in ("size", "place")} for k, e in shape_test_entries(0).items()}
    (root / "test.json").write_text(json.dumps(old))  # the earlier set: colour and shape only
    image = (root / "train" / "0_bigcenter_0.png").read_bytes()
    ensure_shapes_dataset(root, frames=1, seed=0)
    assert "built by an earlier version" in capsys.readouterr().out
    assert json.loads((root / "test.json").read_text()) == json.loads(json.dumps(shape_test_entries(0)))
    assert (root / "train" / "0_bigcenter_0.png").read_bytes() == image
    ensure_shapes_dataset(root, frames=1, seed=0)  # today's set is left as it is
    assert "earlier version" not in capsys.readouterr().out


def test_a_shapes_set_with_earlier_captions_is_built_again(tmp_path, capsys):
    """A set built before MORE_PLACE_WORDS has today's test.json but other action descriptions: training on it
    would silently miss the captions' newer words."""
    from hw6utils.data import ensure_shapes_dataset
    root = build_shapes_dataset(tmp_path / "shapes", frames=1, seed=0)
    info = json.loads((root / "train_info.json").read_text())
    newer = [key for key, entry in info.items() if any(w in entry["action_description"]
                                                       for words in MORE_PLACE_WORDS.values() for w in words)]
    assert newer  # some keys are captioned in the newer words
    for key in newer:
        info[key]["action_description"] = "It is big and sits in the middle."
    (root / "train_info.json").write_text(json.dumps(info))
    ensure_shapes_dataset(root, frames=1, seed=0)
    assert "built by an earlier version" in capsys.readouterr().out
    assert json.loads((root / "train_info.json").read_text())[newer[0]]["action_description"] != \
        "It is big and sits in the middle."
