"""The course's scorer, reproduced: submission check, FID against the handed-out statistics, CLIP-T and CLIP-I.

What the course scorer did (NOTES.md, "The real course data and its scoring"): FID from torchvision's ImageNet
`inception_v3` with `fc` replaced by identity (2048-d pooled features), images resized to 299x299 and normalised with
mean 0.5 / std 0.5, against `test_mu.npy` / `test_sigma.npy`, Frechet distance with `scipy.linalg.sqrtm` (real part);
CLIP-T = mean cosine between each image's and its prompt's L2-normalised CLIP ViT-B/32 embeddings; CLIP-I = mean
cosine between each image and the hidden ground-truth image of the same name. It accepted exactly one 256x256 PNG
per test.json entry, matched by `image_name`. The leaderboard ranked by FID alone (lower is better).

torchvision is optional here (it does not install beside the CPU torch), so it is imported only by `load_inception`;
CLIP runs through transformers' `CLIPModel` (`openai/clip-vit-base-patch32` holds the same weights as open_clip's
`ViT-B-32-quickgelu`/`openai`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from transformers import CLIPModel, CLIPProcessor

from .data import load_test_prompts

SUBMISSION_SIZE = (256, 256)       # every submitted PNG is 256x256
INCEPTION_SIZE = 299               # Inception v3's input side
STATS_FILES = ("test_mu.npy", "test_sigma.npy")
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"   # torchvision's IMAGENET1K_V1 weights for inception_v3
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), the course's formula (Heusel et al. 2017, eq. 6).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), with `scipy.linalg.sqrtm` keeping only the
    real part: rounding gives the square root of the (PSD-similar) product tiny imaginary parts.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape} "
                         "(were both made with the same feature extractor?)")
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------- FID features
def _open_rgb(image) -> Image.Image:
    """A PIL image or a path, as RGB (like the course scorer's `convert("RGB")`, which drops any alpha)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as img:
        return img.convert("RGB")


def _inception_input(image) -> torch.Tensor:
    """(3, 299, 299) in [-1, 1]: bilinear resize (what torchvision's Resize does to a PIL image), then Normalize(0.5, 0.5)."""
    img = _open_rgb(image).resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(img, dtype=np.float32) / 255).permute(2, 0, 1)   # (3, H, W) in [0, 1]
    return (pixels - 0.5) / 0.5


@torch.no_grad()
def inception_features(images, extractor, batch_size: int = 32, device="cpu") -> np.ndarray:
    """(N, D) float64 features of `images` (paths or PIL images) from `extractor`, a module (B, 3, 299, 299) -> (B, D)."""
    extractor.eval()
    features = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([_inception_input(image) for image in images[start:start + batch_size]]).to(device)
        out = extractor(batch)
        if out.ndim != 2:
            raise ValueError(f"the feature extractor must return (B, D) features, got shape {tuple(out.shape)}")
        features.append(out.double().cpu())
    return torch.cat(features).numpy()


def load_inception(weights_path=None) -> torch.nn.Module:
    """The course's FID network: torchvision `inception_v3` (ImageNet IMAGENET1K_V1 weights) with `fc` = identity.

    `weights_path` is a local copy of torchvision's weight file; without it torchvision downloads the weights into its
    cache. torchvision is optional (`pip install .[score]`) and imported only here. `weights_path` may instead be a
    TorchScript module (`torch.jit.save`) mapping (N, 3, 299, 299) images in [-1, 1] to (N, D) features: a stand-in
    extractor that needs no torchvision (its FID is comparable only with statistics made by the same file).
    """
    where = (f"download {INCEPTION_URL} on a machine with internet and put it at {weights_path}" if weights_path
             else f"download {INCEPTION_URL} and pass its path, or put it in torch's cache "
                  f"({Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_FILE})")
    if weights_path is not None and not Path(weights_path).is_file():
        raise FileNotFoundError(f"{weights_path}: Inception weights not found. FID needs torchvision's {INCEPTION_FILE} "
                                f"(or a TorchScript feature extractor): {where}")
    not_torchscript = ""
    if weights_path is not None:
        try:
            return torch.jit.load(str(weights_path), map_location="cpu").eval()
        except RuntimeError:   # not a TorchScript archive: torchvision's weight file
            not_torchscript = f" ({weights_path} is not a TorchScript extractor, so it was read as torchvision weights)"
    try:
        from torchvision.models import inception_v3
    except (ImportError, RuntimeError) as err:   # a torchvision built for another torch fails with RuntimeError
        raise ImportError(f"FID needs torchvision, which did not import ({err}); install it with `pip install .[score]` "
                          f"(a torchvision build that matches your torch){not_torchscript}") from err
    # transform_input=False as in the course: the images are already normalised with mean 0.5 / std 0.5
    if weights_path is None:
        try:
            model = inception_v3(weights="IMAGENET1K_V1", aux_logits=True, init_weights=False, transform_input=False)
        except OSError as err:   # offline: the download fails with a URLError
            raise FileNotFoundError(f"could not download the Inception weights ({err}); {where}") from err
    else:
        model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()   # keep the 2048-d pooled features instead of the 1000 ImageNet logits
    return model.eval()


def png_files(folder) -> list:
    """The PNGs of a folder, sorted; a missing folder or one without PNGs is a one-line error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise ValueError(f"{folder}: holds no PNG files")
    return paths


def compute_stats(image_paths, extractor, batch_size: int = 32, device="cpu") -> tuple:
    """(mu, sigma): mean (D,) and covariance (D, D) of the extractor's features over the images (paths or PIL)."""
    if len(image_paths) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(image_paths)}")
    features = inception_features(image_paths, extractor, batch_size, device)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_stats(out_dir, mu, sigma) -> Path:
    """Write `test_mu.npy` and `test_sigma.npy` (the course's file names) into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / STATS_FILES[0], np.asarray(mu))
    np.save(out_dir / STATS_FILES[1], np.asarray(sigma))
    return out_dir


def load_stats(stats_dir) -> tuple:
    """(mu, sigma) from `test_mu.npy` / `test_sigma.npy` in stats_dir."""
    stats_dir = Path(stats_dir)
    for name in STATS_FILES:
        if not (stats_dir / name).is_file():
            raise FileNotFoundError(f"{stats_dir / name}: FID reference statistics not found; put the course's "
                                    f"{' and '.join(STATS_FILES)} (handed out with test.json) in {stats_dir}, "
                                    "or make your own with compute_stats and save_stats")
    return np.load(stats_dir / STATS_FILES[0]), np.load(stats_dir / STATS_FILES[1])


# ----------------------------------------------------------------------------------------------- CLIP
def load_clip(name_or_path: str = DEFAULT_CLIP, device="cpu") -> tuple:
    """(model, processor): a transformers CLIPModel and CLIPProcessor from a hub id or a local folder."""
    try:
        model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
        processor = CLIPProcessor.from_pretrained(name_or_path)
    except OSError as err:
        raise FileNotFoundError(
            f"CLIP weights not found at {str(name_or_path)!r} ({str(err).splitlines()[0]}). CLIP-T and CLIP-I need "
            f"{DEFAULT_CLIP} (config, weights, tokenizer and preprocessor files): on a machine with internet run "
            f"`hf download {DEFAULT_CLIP} --local-dir data/clip-vit-base-patch32` and pass that folder") from err
    return model, processor


@torch.no_grad()
def _image_embeddings(images, model, processor, batch_size: int) -> torch.Tensor:
    """(N, projection_dim) L2-normalised CLIP image embeddings of paths or PIL images."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [_open_rgb(image) for image in images[start:start + batch_size]]
        pixel_values = processor(images=batch, return_tensors="pt").pixel_values.to(model.device)
        # transformers 5 returns a model output; its pooler_output is the projected embedding
        chunks.append(model.get_image_features(pixel_values=pixel_values).pooler_output.float().cpu())
    return F.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def _text_embeddings(prompts, model, processor, batch_size: int) -> torch.Tensor:
    """(N, projection_dim) L2-normalised CLIP text embeddings; prompts past CLIP's 77 tokens are truncated."""
    max_length = model.config.text_config.max_position_embeddings
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = processor(text=list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                           truncation=True, max_length=max_length).to(model.device)
        chunks.append(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
                      .pooler_output.float().cpu())
    return F.normalize(torch.cat(chunks), dim=-1)


def clip_t(images, prompts, model, processor, batch_size: int = 32) -> float:
    """CLIP-T: mean cosine between each image's and its prompt's L2-normalised CLIP embeddings."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"clip_t needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    image_emb = _image_embeddings(images, model, processor, batch_size)
    text_emb = _text_embeddings(prompts, model, processor, batch_size)
    return float((image_emb * text_emb).sum(dim=-1).mean())


def clip_i(images, reference_images, model, processor, batch_size: int = 32) -> float:
    """CLIP-I: mean cosine between the CLIP image embeddings of each image and its reference (same-named) image."""
    if len(images) != len(reference_images) or not images:
        raise ValueError(f"clip_i needs one reference per image, got {len(images)} images and {len(reference_images)} references")
    image_emb = _image_embeddings(images, model, processor, batch_size)
    reference_emb = _image_embeddings(reference_images, model, processor, batch_size)
    return float((image_emb * reference_emb).sum(dim=-1).mean())


# ----------------------------------------------------------------------------------------------- submission
def check_submission(images_dir, test_json) -> list:
    """Problems that would make the course reject the folder: exactly one RGB 256x256 PNG per test.json `image_name`.

    Returns one line per missing, extra, unreadable, non-PNG or wrongly sized file, and per link or special file
    (never followed or opened: a link could point at the hidden ground truth); an empty list when all is well.
    """
    images_dir = Path(images_dir)
    names = [name for name, _, _ in load_test_prompts(test_json)]
    if images_dir.is_symlink() or not images_dir.is_dir():
        return [f"{images_dir}: not a folder" + (" (a symbolic link)" if images_dir.is_symlink() else "")]
    expected = set(names)
    present = {path.name for path in images_dir.iterdir()}
    problems = [f"missing: {name}" for name in sorted(expected - present)]
    problems += [f"extra: {name} (not in test.json)" for name in sorted(present - expected)]
    for name in sorted(expected & present):
        path = images_dir / name
        if path.is_symlink() or not path.is_file():
            kind = "symbolic link" if path.is_symlink() else "folder or special file"
            problems.append(f"not a regular file: {name} is a {kind}")
            continue
        try:
            with Image.open(images_dir / name) as img:
                img.load()   # decode it all, so a truncated file counts as unreadable
                found_format, size, mode = img.format, img.size, img.mode
        # PIL raises SyntaxError for some broken PNG chunks, DecompressionBombError for huge images
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            problems.append(f"unreadable: {name} ({err})")
            continue
        if found_format != "PNG":
            problems.append(f"not a PNG: {name} is {found_format}")
        elif mode != "RGB":
            problems.append(f"not RGB: {name} is {mode}")
        elif size != SUBMISSION_SIZE:
            problems.append(f"wrong size: {name} is {size[0]}x{size[1]}, expected {SUBMISSION_SIZE[0]}x{SUBMISSION_SIZE[1]}")
    return problems


def score(images_dir, test_json, stats_dir, reference_dir=None, extractor=None, clip_model: str = DEFAULT_CLIP,
          out_json=None, batch_size: int = 32, device="cpu") -> dict:
    """FID, CLIP-T and (with reference_dir, the ground-truth images) CLIP-I of a submission folder, as the course scored it.

    extractor: the FID network, or a path for `load_inception` (None: torchvision's weights, downloaded); clip_model: a hub
    id or local folder, or a (model, processor) pair from `load_clip`. The figures are printed and saved as JSON to
    out_json (default `<images_dir>_scores.json`, beside the folder so it does not become an extra file in it).
    """
    images_dir = Path(images_dir).resolve()
    problems = check_submission(images_dir, test_json)
    if problems:
        raise ValueError(f"{images_dir}: not scored, {problem_summary(problems)}")
    entries = load_test_prompts(test_json)
    image_paths = [images_dir / name for name, _, _ in entries]
    prompts = [prompt for _, prompt, _ in entries]
    reference_paths = None
    if reference_dir is not None:
        reference_paths = [Path(reference_dir) / name for name, _, _ in entries]
        missing = [path.name for path in reference_paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{reference_dir}: {len(missing)} reference image(s) missing for CLIP-I: {', '.join(missing)}")

    # load everything before the slow part, so a missing file fails in seconds
    mu_ref, sigma_ref = load_stats(stats_dir)
    if extractor is None or isinstance(extractor, (str, Path)):  # a weight file (or None: the default) is loaded now
        extractor = load_inception(extractor)
    extractor = extractor.to(device)
    model, processor = clip_model if isinstance(clip_model, tuple) else load_clip(clip_model, device)

    mu, sigma = compute_stats(image_paths, extractor, batch_size, device)
    scores = {"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
              "clip_t": clip_t(image_paths, prompts, model, processor, batch_size)}
    if reference_paths is not None:
        scores["clip_i"] = clip_i(image_paths, reference_paths, model, processor, batch_size)
    scores["num_images"] = len(image_paths)

    print(" ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in scores.items()))
    out_json = Path(out_json) if out_json is not None else images_dir.with_name(images_dir.name + "_scores.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    return scores


def sweep_scorer(test_json, stats_dir, out_dir, reference_dir=None, extractor=None, clip_model: str = DEFAULT_CLIP,
                 limit: int = 0, batch_size: int = 32, device="cpu") -> tuple:
    """(prompts, score_images) for `evaluation.sweep` on the course's test.json (its first `limit` entries if limit > 0).

    score_images(images, cell) saves the images as 256x256 PNGs named `image_name` in
    `out_dir/<sampler>_<steps>_g<guidance>/` and scores that folder with `score`. On a subset, FID against the full
    test set's statistics runs high: compare the rows with each other, not with the leaderboard.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = load_test_prompts(test_json)
    if limit > 0:   # a test.json of the first `limit` entries, for `score` to check the folders against
        raw = json.loads(Path(test_json).read_text(encoding="utf-8"))
        test_json = out_dir / "test.json"
        test_json.write_text(json.dumps(dict(list(raw.items())[:limit]), indent=1), encoding="utf-8")
        entries = entries[:limit]
    if len(entries) < 2:
        raise ValueError(f"{test_json}: FID needs at least 2 images, got {len(entries)} prompt(s) (raise the limit)")
    # load everything once, before the first image is generated
    load_stats(stats_dir)
    extractor = load_inception() if extractor is None else extractor
    clip = load_clip(clip_model, device)

    def score_images(images, cell) -> dict:
        folder = out_dir / f"{cell['sampler']}_{cell['steps']}_g{cell['guidance']:g}"
        shutil.rmtree(folder, ignore_errors=True)  # the sweep's own scratch: an earlier, longer run's images go
        folder.mkdir()
        for (name, _, _), image in zip(entries, images):
            image.convert("RGB").resize(SUBMISSION_SIZE, Image.BICUBIC).save(folder / name, format="PNG")
        scores = score(folder, test_json, stats_dir, reference_dir, extractor, clip, batch_size=batch_size, device=device)
        return {key: value for key, value in scores.items() if key != "num_images"}

    return [prompt for _, prompt, _ in entries], score_images


def problem_summary(problems: list, shown: int = 5) -> str:
    """'N problem(s): the first five; and M more', for one-line errors and the grades table."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{len(problems)} problem(s): " + "; ".join(problems[:shown]) + more


def package_submission(student_id: str, images_dir, test_json, out_dir=".", report=None, model_note: str = "",
                       code_root=None) -> Path:
    """Write the course zip `hw6_<ID>.zip` holding `hw6_<ID>/`: `code/` (hw6utils, the notebooks and the shipped
    reference model: a checkout that `hw6 grade` reruns, its notebook 05 writing to `results/`), `results/` (the
    PNGs), `MODEL.md` (where the model lives) and the report if given. Refuses, naming the problems (the first
    five), if the images would be rejected by the scorer."""
    if not student_id or not str(student_id).replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"student id must be letters, digits, '-' or '_', got {student_id!r}")
    problems = check_submission(images_dir, test_json)
    if problems:
        raise ValueError(f"{images_dir}: not packaged, {problem_summary(problems)}")
    if report is not None and not Path(report).is_file():
        raise FileNotFoundError(f"{report}: report not found")
    code_root = Path(code_root) if code_root else Path(__file__).resolve().parent.parent
    top = f"hw6_{student_id}"
    out = Path(out_dir) / f"{top}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        write_zip(tmp, top, code_root, images_dir, test_json, report, model_note)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def write_zip(zip_path: Path, top: str, code_root: Path, images_dir, test_json, report, model_note: str) -> None:
    import zipfile

    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        # the code as a checkout that runs: hw6 grade reruns code/notebooks/ with this hw6utils (the 'reference'
        # autoencoder and model included), and they write the test.json PNGs to results/ (RESULTS_DIR)
        for pattern in ("hw6utils/*.py", "notebooks/*.ipynb", "data/reference/**/*", "README.md", "pyproject.toml",
                        "Makefile", "environment.yml"):
            for path in sorted(code_root.glob(pattern)):
                if path.is_file():
                    archive.write(path, f"{top}/code/{path.relative_to(code_root)}")
        for name, _, _ in load_test_prompts(test_json):
            archive.write(Path(images_dir) / name, f"{top}/results/{name}")
        archive.writestr(f"{top}/MODEL.md", "# Model\n\n" + (model_note or "The trained checkpoint is not included; "
                                                                        "see the code's README to retrain it.") + "\n")
        if report is not None:
            archive.write(report, f"{top}/{Path(report).name}")
