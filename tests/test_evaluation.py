import random

from PIL import Image

from hw6utils.data import PLACES, SIZES, render_shape, shape_pairs
from hw6utils.evaluation import check_shape_image, image_grid, score_shape_images


def test_the_check_reads_the_datasets_own_images():
    rng = random.Random(5)
    images, entries, places_ok = [], [], 0
    for _ in range(400):
        colour, shape = rng.choice(shape_pairs())
        size, place = rng.choice(list(SIZES)), rng.choice(list(PLACES))
        image = render_shape(colour, shape, size, place, rng)
        images.append(image)
        entries.append({"colour": colour, "shape": shape})
        found = check_shape_image(image)
        places_ok += (found["size"], found["place"]) == (size, place)
    scores = score_shape_images(images, entries)
    assert scores["colour_shape"] >= 0.98, scores
    assert places_ok / 400 >= 0.95


def test_blank_and_wrong_images_score_zero():
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    assert check_shape_image(blank)["colour"] is None
    red_circle = render_shape("red", "circle", "big", "center", random.Random(0))
    scores = score_shape_images([blank, red_circle], [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "circle"}])
    assert scores["colour_shape"] == 0.0 and scores["shape"] == 0.5


def test_image_grid_size():
    grid = image_grid([Image.new("RGB", (10, 10))] * 5, cols=4, pad=2)
    assert grid.size == (4 * 12 + 2, 2 * 12 + 2)
