"""The shipped reference model (data/reference): complete, small, and good on the fixed prompt set."""
import json

import pytest

from checkout import CHECKOUT
from hw6utils.config import REFERENCE_DIR, load_config
from hw6utils.data import shape_test_entries
from hw6utils.evaluation import format_scores
from hw6utils.notebooks import run_notebooks
from hw6utils.sampling import load_model

NOTEBOOK_DIR = CHECKOUT / "notebooks"


def test_reference_is_complete_and_small():
    for name in ["unet/diffusion_pytorch_model.safetensors", "unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "scheduler/scheduler_config.json", "hw6_config.json"]:
        assert (REFERENCE_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in REFERENCE_DIR.rglob("*") if p.is_file())
    assert total <= 15 * 2**20, f"data/reference holds {total / 2**20:.1f} MB"
    assert load_config(REFERENCE_DIR / "hw6_config.json").encoders.vae == "reference"


def test_the_reference_preset_is_the_recipe_the_shipped_model_was_trained_with():
    """`make reference` trains `get_preset("reference")`: a change to the tiny preset (which it starts from) must
    not change it unseen."""
    import dataclasses

    from hw6utils.config import get_preset
    assert dataclasses.asdict(get_preset("reference")) == dataclasses.asdict(load_config(REFERENCE_DIR / "hw6_config.json"))


@pytest.mark.slow
def test_reference_follows_the_whole_prompt_on_the_fixed_prompts(tmp_path, kernels_import_this_checkout):
    """At the model's own defaults (DDIM 50, guidance 2) on the 168 fixed prompts: at least 97% colour+shape and at
    least 90% all four (colour, shape, size and place), on the held-out colour-shape pairs and unseen phrasings too.
    Measured: colour+shape 98.8% (held-out 100%, unseen phrasings 98.3%), all four 100% (held-out, training-style
    and unseen phrasings 100%); its two misses are unsized stars drawn small as a circle and a triangle.
    The scores are those of notebook 07 run with its defaults (the reference model), as a person runs it (nbval
    leaves 07 to this test: one generation of the 168 images, not two)."""
    assert load_model("reference").cfg.sample.guidance_scale == 2.0
    run_notebooks(["07_evaluation"], {"OUTPUT_DIR": str(tmp_path)}, out_dir=tmp_path / "executed", cwd=NOTEBOOK_DIR,
                  timeout=900)
    scores = json.loads((tmp_path / "eval_reference.json").read_text())
    assert (tmp_path / "eval_reference.png").is_file()
    assert [row["prompt"] for row in scores["per_prompt"]] == [e["text_prompt"] for e in shape_test_entries(0).values()]
    print(format_scores("reference", scores))
    # make demo prints the reference's figures from data/reference/eval.json instead of scoring it again: they
    # must be what it gets, prompt by prompt
    stored = json.loads((REFERENCE_DIR / "eval.json").read_text())
    assert [row["prompt"] for row in stored["per_prompt"]] == [row["prompt"] for row in scores["per_prompt"]]
    differ = [row["prompt"] for row, again in zip(stored["per_prompt"], scores["per_prompt"]) if row != again]
    assert len(differ) <= 2, differ  # (bf16-free CPU generation; a different CPU may flip a borderline image)
    for part in ("", "_held_out", "_unseen_phrasing"):
        assert scores["colour_shape" + part] >= 0.97, (part, scores)
    for part in ("", "_held_out", "_seen_phrasing", "_unseen_phrasing"):
        assert scores["all_four" + part] >= 0.90, (part, scores)
