"""The prompt explorer of notebook 06: ipywidgets wiring around `sampling.generate_images`, nothing more."""
from __future__ import annotations

import html
import io

import ipywidgets as widgets

from .sampling import LoadedModel, generate_images


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes, what `widgets.Image` shows."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prompt_explorer(model: LoadedModel, default_prompt: str = "A red circle. It is big and sits in the middle.",
                    guidance_scale: float | None = None, num_inference_steps: int = 50, seed: int = 0, count: int = 4):
    """An app to try prompts on a loaded model. Returns (app, controls).

    `app` is the widget to display; `controls` maps names to its widgets (prompt, guidance_scale, steps, seed,
    count, button, progress, gallery, message), so code can set values and call `controls["button"].click()`.
    A failure (a bad prompt, out of memory) is shown in `message`, in red, and the app stays usable.
    Image i uses seed + i, as `hw6 generate` does, so a picture can be reproduced from its seed.
    """
    if guidance_scale is None:  # the model's own default (saved in its hw6_config.json)
        guidance_scale = model.pipe.config.guidance_scale
    controls = {
        "prompt": widgets.Text(value=default_prompt, description="prompt", layout=widgets.Layout(width="95%")),
        "guidance_scale": widgets.FloatSlider(value=guidance_scale, min=0.0, max=15.0, step=0.5,
                                              description="guidance"),
        "steps": widgets.IntSlider(value=num_inference_steps, min=1, max=200, description="DDIM steps"),
        "seed": widgets.IntText(value=seed, description="first seed"),
        "count": widgets.IntSlider(value=count, min=1, max=8, description="images"),
        "button": widgets.Button(description="Generate", button_style="primary"),
        "progress": widgets.IntProgress(value=0, min=0, max=num_inference_steps, description="progress"),
        "gallery": widgets.HBox(),
        "message": widgets.HTML(),
    }

    def on_generate(_button):
        c = controls
        c["button"].disabled = True
        c["progress"].value, c["progress"].max = 0, c["steps"].value
        c["gallery"].children, c["message"].value = (), ""

        def show_step(step, total):  # the bar moves after every denoising step of the one batched call
            c["progress"].value = step

        try:
            count = c["count"].value
            images = generate_images(model, [c["prompt"].value] * count, [c["seed"].value + i for i in range(count)],
                                     guidance_scale=c["guidance_scale"].value, num_inference_steps=c["steps"].value,
                                     batch_size=count, progress=False, callback=show_step)
            c["gallery"].children = tuple(widgets.Image(value=png_bytes(image), format="png", width=128, height=128)
                                          for image in images)
        except Exception as err:  # a click's exception would only reach the log console, not the person
            c["message"].value = f'<span style="color: #c00">error: {html.escape(str(err).splitlines()[0] if str(err) else type(err).__name__)}</span>'
        finally:
            c["button"].disabled = False

    controls["button"].on_click(on_generate)
    sliders = widgets.HBox([controls["guidance_scale"], controls["steps"]])
    numbers = widgets.HBox([controls["seed"], controls["count"]])
    actions = widgets.HBox([controls["button"], controls["progress"]])
    app = widgets.VBox([controls["prompt"], sliders, numbers, actions, controls["message"], controls["gallery"]])
    return app, controls
