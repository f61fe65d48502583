import io

import numpy as np

from PIL import Image

from hw6utils.config import apply_overrides
from hw6utils.sampling import generate_images, load_model
from hw6utils.training import train
from hw6utils.widgets import prompt_explorer


def test_generate_button_fills_the_gallery(smoke_cfg):
    train(apply_overrides(smoke_cfg, max_steps=1, eval_freq=0), progress=False)  # a random-ish model, 1 step
    model = load_model("last", smoke_cfg.train.output_dir)
    app, controls = prompt_explorer(model)
    controls["prompt"].value = "A blue square. It is small and sits in the top left corner."
    controls["guidance_scale"].value = 3.0
    controls["seed"].value = 5
    controls["count"].value = 3
    controls["steps"].value = 2
    controls["button"].click()
    shown = controls["gallery"].children
    assert len(shown) == 3
    size = smoke_cfg.data.image_size
    assert all(Image.open(io.BytesIO(w.value)).size == (size, size) for w in shown)
    assert controls["progress"].value == controls["progress"].max == 2  # one tick per denoising step
    assert not controls["button"].disabled
    assert controls["gallery"] in app.children
    last = generate_images(model, [controls["prompt"].value], [7], 3.0, 2, progress=False)[0]  # seeds 5, 6, 7
    pixels = np.asarray(Image.open(io.BytesIO(shown[-1].value)), dtype=np.int16)
    assert np.abs(pixels - np.asarray(last, dtype=np.int16)).max() <= 1  # same seed, alone or in a batch
