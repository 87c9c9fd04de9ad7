"""The first 100 images of a shapes folder as a 10 x 10 grid, 4x nearest-neighbour zoom.

    python docs/scripts/shapes_grid.py outputs/shapes_seed0 docs/shapes_samples.png
"""
import sys

from stepdistill.evaluation.reference import list_images, load_images
from stepdistill.images import save_image_grid

print(save_image_grid(load_images(list_images(sys.argv[1])[:100], 3), sys.argv[2], nrow=10, upscale=4))
