"""The course scorer on tiny fixtures: random-weight extractor and CLIP, four 256x256 PNGs, no downloads."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from course_fixture import write_course_fixture
from hw6utils.cli import main
from hw6utils.data import load_test_prompts
from hw6utils.scoring import (check_submission, compute_stats, frechet_distance, load_inception, problem_summary,
                              save_stats, score)

try:
    import torchvision  # noqa: F401
    TORCHVISION_ERROR = None
except (ImportError, RuntimeError) as err:   # RuntimeError: a torchvision built for another torch
    TORCHVISION_ERROR = f"torchvision does not import here ({err})"

NAMES = ["0_main.png", "0_jump.png", "1_main.png", "1_attack1.png"]


def write_test_json(path, names) -> None:
    entries = {name[:-4]: {"image_name": name, "given_description": f"monster {i}", "action_description": "",
                           "text_prompt": f"a small red monster number {i} jumping"} for i, name in enumerate(names)}
    path.write_text(json.dumps(entries), encoding="utf-8")


def random_png(path, seed: int, size=(256, 256), image_format="PNG", brightest: int = 255) -> None:
    pixels = np.random.default_rng(seed).integers(0, brightest + 1, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=image_format)


def tiny_extractor() -> torch.nn.Module:
    """(B, 3, 299, 299) -> (B, 8): a stand-in for Inception's 2048-d pooled features."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, kernel_size=5, stride=4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory):
    """tiny_extractor saved as TorchScript: what `--inception` takes in place of torchvision's weight file."""
    path = tmp_path_factory.mktemp("extractor") / "extractor.pt"
    torch.jit.save(torch.jit.script(tiny_extractor()), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A 2-layer random CLIPModel with a byte-level tokenizer (every byte a token, no merges), saved like a hub folder."""
    path = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    return path


@pytest.fixture
def submission(tmp_path):
    """(images_dir, test.json, stats_dir): four good PNGs, and FID statistics from 12 other, darker images."""
    images_dir, other_dir = tmp_path / "png", tmp_path / "other"
    images_dir.mkdir()
    other_dir.mkdir()
    write_test_json(tmp_path / "test.json", NAMES)
    for seed, name in enumerate(NAMES):
        random_png(images_dir / name, seed)
    for seed in range(12):
        random_png(other_dir / f"{seed}.png", 100 + seed, brightest=127)
    mu, sigma = compute_stats(sorted(other_dir.iterdir()), tiny_extractor(), batch_size=5)
    return images_dir, tmp_path / "test.json", save_stats(tmp_path / "stats", mu, sigma)


def test_frechet_distance_matches_the_diagonal_formula():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    # diagonal covariances: ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)) = 5 + (1 + 1 + 0) = 7
    by_hand = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert by_hand == 7.0
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(7.0, abs=1e-9)
    sigma = np.cov(np.random.default_rng(0).normal(size=(50, 6)), rowvar=False)
    assert frechet_distance(mu1.repeat(2), sigma, mu1.repeat(2), sigma) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(mu1, np.diag(var1), mu1[:2], np.eye(2))


def test_check_submission_names_every_problem(tmp_path):
    names = ["good.png", "small.png", "jpeg.png", "gone.png", "broken.png", "rgba.png", "bomb.png"]
    write_test_json(tmp_path / "test.json", names)
    images_dir = tmp_path / "png"
    images_dir.mkdir()
    random_png(images_dir / "good.png", 0)
    Image.new("RGBA", (256, 256)).save(images_dir / "rgba.png")
    Image.new("1", (20000, 20000)).save(images_dir / "bomb.png")  # 48 kB, 400 M pixels: PIL refuses it
    random_png(images_dir / "small.png", 1, size=(128, 96))
    random_png(images_dir / "jpeg.png", 2, image_format="JPEG")
    (images_dir / "broken.png").write_bytes(b"not an image")
    random_png(images_dir / "stray.png", 3)

    problems = check_submission(images_dir, tmp_path / "test.json")
    assert len(problems) == 7, problems
    for name, kind in [("small.png", "wrong size"), ("jpeg.png", "not a PNG"), ("gone.png", "missing"),
                       ("broken.png", "unreadable"), ("stray.png", "extra"), ("rgba.png", "not RGB"),
                       ("bomb.png", "unreadable")]:
        assert [p for p in problems if name in p and p.startswith(kind)], (name, problems)
    assert any("128x96" in p for p in problems)

    write_test_json(tmp_path / "test.json", ["good.png"])
    for name in ["small.png", "jpeg.png", "broken.png", "stray.png", "rgba.png", "bomb.png"]:
        (images_dir / name).unlink()
    assert check_submission(images_dir, tmp_path / "test.json") == []


def test_score_end_to_end(submission, tiny_clip_dir, tmp_path):
    images_dir, test_json, stats_dir = submission
    out_json = tmp_path / "scores.json"
    # the submission as its own reference: CLIP-I of identical images is 1
    scores = score(images_dir, test_json, stats_dir, reference_dir=images_dir, extractor=tiny_extractor(),
                   clip_model=str(tiny_clip_dir), out_json=out_json, batch_size=3)
    for key in ["fid", "clip_t", "clip_i"]:
        assert isinstance(scores[key], float) and math.isfinite(scores[key]), scores
    assert scores["fid"] > 0 and -1 <= scores["clip_t"] <= 1
    assert scores["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert scores["num_images"] == len(NAMES)
    assert json.loads(out_json.read_text()) == scores


def test_score_refuses_a_bad_submission_or_missing_stats(submission):
    images_dir, test_json, stats_dir = submission
    (stats_dir / "test_sigma.npy").unlink()
    with pytest.raises(FileNotFoundError, match="test_sigma.npy"):
        score(images_dir, test_json, stats_dir, extractor=tiny_extractor())
    (images_dir / NAMES[1]).unlink()
    random_png(images_dir / "extra.png", 9)
    with pytest.raises(ValueError, match="2 problem") as info:
        score(images_dir, test_json, stats_dir, extractor=tiny_extractor())
    assert f"missing: {NAMES[1]}; extra: extra.png" in str(info.value)


def test_load_inception_names_the_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception_v3_google-0cc3c7bd.pth"):
        load_inception(tmp_path / "inception.pth")


@pytest.mark.skipif(TORCHVISION_ERROR is None, reason="torchvision imports here")
def test_load_inception_without_torchvision_names_the_extra(tmp_path):
    with pytest.raises(ImportError, match=r"pip install \.\[score\]"):
        load_inception()
    (tmp_path / "junk.pt").write_bytes(b"neither TorchScript nor torchvision weights")
    with pytest.raises(ImportError, match="junk.pt is not a TorchScript extractor"):
        load_inception(tmp_path / "junk.pt")


def test_stats_and_score_through_the_cli_with_stand_in_extractors(extractor_file, tiny_clip_dir, tmp_path, capsys):
    """`hw6 stats` and `hw6 score` on the course fixture, FID from a TorchScript extractor, CLIP from a local folder."""
    root = write_course_fixture(tmp_path / "course")
    images, truth, stats = tmp_path / "png", tmp_path / "gt", tmp_path / "stats"
    images.mkdir()
    truth.mkdir()
    for i, (name, _, _) in enumerate(load_test_prompts(root / "test.json")):
        random_png(images / name, i)
        random_png(truth / name, 50 + i)
    # a teacher's statistics from a folder of sprites of mixed sizes and modes (the fixture's training images)
    assert main(["stats", str(root / "train"), "--out", str(stats), "--inception", str(extractor_file)]) == 0
    assert np.load(stats / "test_mu.npy").shape == (8,) and np.load(stats / "test_sigma.npy").shape == (8, 8)
    args = ["score", str(images), "--test-json", str(root / "test.json"), "--stats", str(stats), "--reference",
            str(truth), "--inception", str(extractor_file), "--clip", str(tiny_clip_dir), "--out", str(tmp_path / "s.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    scores = json.loads((tmp_path / "s.json").read_text())
    for key in ["fid", "clip_t", "clip_i"]:
        assert math.isfinite(scores[key]) and f"{key} {scores[key]:.4f}" in printed, (key, printed)
    assert scores["num_images"] == 4 and scores["fid"] > 0 and -1 <= scores["clip_t"] <= 1 and scores["clip_i"] < 0.9999
    # the TorchScript file gives the figures of the module it was saved from
    direct = score(images, root / "test.json", stats, truth, tiny_extractor(), str(tiny_clip_dir), tmp_path / "d.json")
    assert scores == pytest.approx(direct, rel=1e-6)
    capsys.readouterr()

    (images / "0_main.png").unlink()
    random_png(images / "stray.png", 9)
    random_png(images / "1_attack.png", 1, size=(128, 128))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "3 problem(s)" in err, err
    for problem in ["missing: 0_main.png", "extra: stray.png", "wrong size: 1_attack.png is 128x128"]:
        assert problem in err, (problem, err)

    missing = tmp_path / "weights" / "inception_v3_google-0cc3c7bd.pth"
    assert main(["stats", str(truth), "--out", str(stats), "--inception", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{missing}: Inception weights not found" in err
    assert f"download https://download.pytorch.org/models/{missing.name}" in err and f"put it at {missing}" in err


@pytest.mark.skipif(TORCHVISION_ERROR is not None, reason=TORCHVISION_ERROR or "")
def test_load_inception_gives_2048_pooled_features(tmp_path):
    from torchvision.models import inception_v3

    weights = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    model = load_inception(weights)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 299, 299)).shape == (2, 2048)


def test_package_writes_the_course_zip_and_refuses_bad_folders(tmp_path):
    import zipfile

    from hw6utils.cli import main
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps({"0": {"text_prompt": "a", "image_name": "0_main.png"},
                                     "1": {"text_prompt": "b", "image_name": "1_hit.png"}}))
    images = tmp_path / "png"
    images.mkdir()
    Image.new("RGB", (256, 256), "white").save(images / "0_main.png")
    assert main(["package", "--student-id", "b12345", "--images", str(images), "--test-json", str(test_json),
                 "--out", str(tmp_path)]) == 2  # 1_hit.png is missing
    assert not (tmp_path / "hw6_b12345.zip").exists()
    Image.new("RGB", (256, 256), "white").save(images / "1_hit.png")
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4")
    assert main(["package", "--student-id", "b12345", "--images", str(images), "--test-json", str(test_json),
                 "--out", str(tmp_path), "--report", str(tmp_path / "report.pdf"), "--model-note", "https://x/y"]) == 0
    names = zipfile.ZipFile(tmp_path / "hw6_b12345.zip").namelist()
    assert {"hw6_b12345/results/0_main.png", "hw6_b12345/results/1_hit.png", "hw6_b12345/MODEL.md",
            "hw6_b12345/report.pdf", "hw6_b12345/code/hw6utils/training.py"} <= set(names)
    assert any(n.startswith("hw6_b12345/code/notebooks/") for n in names)
    before = (tmp_path / "hw6_b12345.zip").read_bytes()
    assert main(["package", "--student-id", "b12345", "--images", str(images), "--test-json", str(test_json),
                 "--out", str(tmp_path), "--report", str(tmp_path / "missing.pdf")]) == 2
    assert (tmp_path / "hw6_b12345.zip").read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_a_problem_list_is_cut_to_five_and_counted():
    assert problem_summary(["missing: a.png"]) == "1 problem(s): missing: a.png"
    many = problem_summary([f"missing: {i}.png" for i in range(8)])
    assert many.startswith("8 problem(s): missing: 0.png;") and "4.png" in many and "5.png" not in many
    assert many.endswith("; and 3 more")
