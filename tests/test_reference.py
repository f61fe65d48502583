"""The shipped reference model (data/reference): complete, small, and good on the fixed prompt set."""
import json

import pytest

from hw6utils.config import REFERENCE_DIR, load_config
from hw6utils.data import shape_test_entries
from hw6utils.evaluation import evaluate_shapes, format_scores
from hw6utils.sampling import load_model


def test_reference_is_complete_and_small():
    for name in ["unet/diffusion_pytorch_model.safetensors", "unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "scheduler/scheduler_config.json", "hw6_config.json"]:
        assert (REFERENCE_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in REFERENCE_DIR.rglob("*") if p.is_file())
    assert total <= 15 * 2**20, f"data/reference holds {total / 2**20:.1f} MB"
    assert load_config(REFERENCE_DIR / "hw6_config.json").encoders.vae == "reference"


@pytest.mark.slow
def test_reference_gets_colour_and_shape_right_on_the_fixed_prompts():
    """The project's target: 90% colour+shape at the model's own defaults (DDIM 50, guidance 2). Measured 98.2%
    on the 168 fixed prompts with these seeds (165; 152 pass; 95.8% when the check took wavering squares for
    circles); 91.7% on the earlier 72-prompt set (90.6% averaged over 4 seed sets)."""
    model = load_model("reference")
    assert model.cfg.sample.guidance_scale == 2.0
    scores, _ = evaluate_shapes(model, list(shape_test_entries(0).values()), guidance_scale=2.0, num_inference_steps=50)
    print(format_scores("reference", scores))
    # make demo prints the reference's figures from data/reference/eval.json instead of scoring it again: they
    # must be what it gets, prompt by prompt
    stored = json.loads((REFERENCE_DIR / "eval.json").read_text())
    assert [row["prompt"] for row in stored["per_prompt"]] == [row["prompt"] for row in scores["per_prompt"]]
    differ = [row["prompt"] for row, again in zip(stored["per_prompt"], scores["per_prompt"]) if row != again]
    assert len(differ) <= 2, differ  # (bf16-free CPU generation; a different CPU may flip a borderline image)
    assert scores["colour_shape"] >= 0.90, scores
    assert scores["colour"] >= 0.85, scores
