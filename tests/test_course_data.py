"""The real course schema, read exactly, on a faithful fixture; data check, training and generation run on it."""
import json

import pytest
from PIL import Image

from course_fixture import ACTIONS, write_course_fixture
from hw6utils.cli import main
from hw6utils.config import apply_overrides
from hw6utils.data import check_course_data, load_course_data
from hw6utils.sampling import generate
from hw6utils.training import train


@pytest.fixture(scope="module")
def course_dir(tmp_path_factory):
    return write_course_fixture(tmp_path_factory.mktemp("course") / "public_data")


def test_the_real_schema_is_read_exactly(course_dir):
    with pytest.warns(UserWarning, match="1 key\\(s\\) have no images, e.g. '0_skill3'"):
        data = load_course_data(course_dir)
    assert len(data) == 4 * (len(ACTIONS) * 2 + 1) - 2          # 2 frames per key, 3 for move, none for 0_skill3
    assert data.captions["1_main"][0] == "A green blob monster with a dark hat, number 1."   # no trailing space
    assert data.captions["2_attack12"][2] == "Monster 2: a hatted ball. The monster is attacking."
    assert {k.split("_")[1] for k in data.image_keys} == set(ACTIONS)
    assert "3_move_3.png" in {p.name for p in data.image_paths}


def test_data_check_counts_families_problems_and_long_captions(course_dir):
    from transformers import AutoTokenizer

    from hw6utils.encoders import resolve_text_encoder
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder("minilm"))
    report = check_course_data(course_dir, tokenizer, max_text_len=16)
    assert (report["monsters"], report["keys"], report["test_prompts"]) == (4, 4 * len(ACTIONS), 4)
    assert report["images_per_action_family"]["attack"] == 16 and report["images_per_action_family"]["skill"] == 6
    assert any("0_skill3" in p for p in report["problems"])
    assert 0 < report["captions_truncated"] < report["captions"] and report["test_prompts_truncated"] == 3  # all but the bare `main` one


def test_data_check_of_a_missing_folder_says_so_before_looking_for_a_tokenizer(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2  # the default text encoder is a hub id
    err = capsys.readouterr().err
    assert "nowhere: data folder not found" in err and "tokenizer" not in err


def test_data_check_command(course_dir, capsys):
    assert main(["data", "check", str(course_dir), "--text_encoder", "minilm"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 90 and report["captions_truncated"] == 0


def test_training_and_generation_run_on_the_course_format(course_dir, vae_dir, tmp_path):
    from hw6utils.config import get_preset
    cfg = get_preset("smoke", data_dir=str(course_dir), vae=str(vae_dir), output_dir=str(tmp_path / "out"),
                     flip=True, image_prep="center", max_steps=2, eval_freq=0, num_inference_steps=2)
    history = train(cfg, progress=False)
    assert len(history) == 2
    out = generate(apply_overrides(cfg, stage="last"), progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0_main.png", "1_attack.png", "2_die.png", "3_move.png"]
    assert Image.open(out / "0_main.png").size == (64, 64)
