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
    last = generate_images(model, [controls["prompt"].value], [7], guidance_scale=3.0, num_inference_steps=2,
                          progress=False)[0]  # seeds 5, 6, 7
    pixels = np.asarray(Image.open(io.BytesIO(shown[-1].value)), dtype=np.int16)
    assert np.abs(pixels - np.asarray(last, dtype=np.int16)).max() <= 1  # same seed, alone or in a batch
    assert controls["message"].value == ""

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    import hw6utils.widgets as widgets_module
    real = widgets_module.generate_images
    widgets_module.generate_images = out_of_memory
    try:
        controls["button"].click()
    finally:
        widgets_module.generate_images = real
    assert "error: CUDA out of memory. Tried to allocate 2.00 GiB" in controls["message"].value
    assert "more detail" not in controls["message"].value and not controls["button"].disabled
    assert controls["gallery"].children == ()
    controls["button"].click()  # the app is still usable, and the message goes away
    assert len(controls["gallery"].children) == 3 and controls["message"].value == ""
