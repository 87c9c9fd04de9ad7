"""The digits as two flat folders of 8x8 grey PNGs, OUT/digits_train (1,500) and OUT/digits_heldout
(297), so that folder tools (`stepdistill features ladder`) run on digits-sized grey data
(docs/shapes.md).

    python docs/scripts/digits_folders.py outputs
"""
import os
import sys

from PIL import Image

from stepdistill.digits.data import load_split

for split in ("train", "heldout"):
    folder = os.path.join(sys.argv[1], f"digits_{split}")
    os.makedirs(folder, exist_ok=False)
    for i, image in enumerate(load_split(split).images):
        Image.fromarray(((image[0] + 1) * 127.5).round().byte().numpy()).save(os.path.join(folder, f"{i:04d}.png"))
    print(f"{folder}: {i + 1} images")
