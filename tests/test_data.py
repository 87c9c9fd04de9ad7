"""The data layer: image folders, `datasets` datasets, the registry, prompt lists and tensor
shards (stepdistill.data)."""

import ast
import io
import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import stepdistill.data.registry as registry
import stepdistill.data.shards as shards
from stepdistill.data import (
    DataError,
    HFImageDataset,
    ImageFolderDataset,
    ShardedTensors,
    ShardWriter,
    TensorImageDataset,
    load_prompts,
    open_images,
    prompt_list,
    register_dataset,
    registered_datasets,
    write_latent_cache,
)
from stepdistill.errors import StepdistillError

datasets = pytest.importorskip("datasets")

DATA_PACKAGE = Path(__file__).resolve().parent.parent / "stepdistill" / "data"


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, **kwargs)
    return path


def solid(colour, size=(8, 8)):
    """An RGB (3 values) or grey (1 value) image of one colour, size (H, W)."""
    image = np.broadcast_to(np.asarray(colour, dtype=np.uint8), (*size, len(colour)))
    return image[..., 0] if len(colour) == 1 else image


def as_float(colour):
    """uint8 values -> the [-1, 1] values images() returns, as a [C, 1, 1] tensor."""
    return (torch.tensor(colour, dtype=torch.float32) / 127.5 - 1.0).reshape(-1, 1, 1)


# --- image folders: layouts ---------------------------------------------------------------------


def test_flat_folder_is_unconditional_sorted_and_in_range(tmp_path):
    colours = {"b.png": (0, 255, 0), "a.png": (255, 0, 0), "c.jpg": (0, 0, 255), ".hidden.png": (9, 9, 9)}
    for name, colour in colours.items():
        save(tmp_path / name, solid(colour), **({"quality": 100} if name.endswith(".jpg") else {}))
    (tmp_path / "notes.txt").write_text("not an image")
    data = open_images(tmp_path)
    assert isinstance(data, ImageFolderDataset)
    assert (data.kind, len(data), data.num_classes, data.class_names) == ("unconditional", 3, None, None)
    assert (data.channels, data.height, data.width) == (3, 8, 8)
    images = data.images([1, 0, 1])
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images[0], as_float((0, 255, 0)).expand(3, 8, 8))  # sorted: a.png, b.png, c.jpg
    assert torch.equal(images[1], as_float((255, 0, 0)).expand(3, 8, 8))
    assert data.conditions([0]) is None
    with pytest.raises(DataError, match="no class labels"):
        data.labels([0])
    with pytest.raises(DataError, match="no captions"):
        data.captions([0])
    assert data.summary() == f"image folder {tmp_path} (flat): 3 images, unconditional, 3x8x8"


def test_class_subfolders_give_sorted_class_names_and_labels(tmp_path):
    save(tmp_path / "dog" / "1.png", solid((10, 10, 10)))
    save(tmp_path / "cat" / "b.png", solid((30, 30, 30)))
    save(tmp_path / "cat" / "nested" / "a.png", solid((20, 20, 20)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images here")
    data = open_images(tmp_path, channels=3)
    assert (data.kind, data.class_names, data.num_classes, len(data)) == ("class", ["cat", "dog"], 2, 3)
    assert data.labels([2, 0, 1]).tolist() == [1, 0, 0]
    assert data.labels(torch.tensor([2])).dtype == torch.long
    assert torch.equal(data.conditions([0, 2]), torch.tensor([0, 1]))
    assert torch.equal(data.images([1])[0], as_float((20, 20, 20)).expand(3, 8, 8))  # cat/b.png < cat/nested/a.png
    assert "class-conditional (2 classes: cat, dog)" in data.summary()


def test_images_next_to_class_folders_are_ambiguous(tmp_path):
    save(tmp_path / "cat" / "a.png", solid((1, 2, 3)))
    save(tmp_path / "stray.png", solid((1, 2, 3)))
    with pytest.raises(DataError, match="ambiguous.*stray.png"):
        open_images(tmp_path)


def test_metadata_jsonl_gives_captions_in_file_order(tmp_path):
    save(tmp_path / "train" / "b.png", solid((0, 0, 200)))
    save(tmp_path / "a.png", solid((200, 0, 0)))
    save(tmp_path / "unlisted.png", solid((0, 0, 0)))
    lines = [{"file_name": "train/b.png", "text": "a blue square"}, {"file_name": "a.png", "caption": "a red square"},
             {"file_name": "gone.png", "prompt": "a lost square"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    data = open_images(tmp_path)
    assert (data.kind, len(data), data.skipped) == ("text", 2, [("gone.png", "file not found")])
    assert data.captions([0, 1]) == ["a red square", "a blue square"]
    assert data.conditions([1]) == ["a blue square"]
    assert torch.equal(data.images([1])[0], as_float((0, 0, 200)).expand(3, 8, 8))
    with pytest.raises(DataError, match="no class labels"):
        data.labels([0])
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2: expected a text/caption/prompt string"):
        open_images(tmp_path)


# --- resizing, channels, flips ------------------------------------------------------------------


def three_bands(height=12, width=24):
    """Red | green | blue vertical thirds: the centre is green."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    image[:, :third, 0] = image[:, third : 2 * third, 1] = image[:, 2 * third :, 2] = 255
    return image


def test_center_crop_keeps_the_centre_and_plain_resize_keeps_everything(tmp_path):
    save(tmp_path / "wide.png", three_bands())
    cropped = open_images(tmp_path, resolution=12).images([0])[0]  # already 12 high: a pure crop of columns 6..17
    assert cropped.shape == (3, 12, 12)
    assert torch.equal(cropped[:, :, 2:10], as_float((0, 255, 0)).expand(3, 12, 8))
    assert torch.equal(cropped[:, :, :2], as_float((255, 0, 0)).expand(3, 12, 2))
    assert torch.equal(cropped[:, :, 10:], as_float((0, 0, 255)).expand(3, 12, 2))

    small = open_images(tmp_path, resolution=6).images([0])[0]  # bicubic to 12x6, then columns 3..8
    assert small.shape == (3, 6, 6)
    assert torch.allclose(small[:, :, 2:4], as_float((0, 255, 0)).expand(3, 6, 2), atol=0.05)

    squeezed = open_images(tmp_path, resolution=6, center_crop=False).images([0])[0]
    assert torch.allclose(squeezed[:, :, :1], as_float((255, 0, 0)).expand(3, 6, 1), atol=0.05)
    assert torch.allclose(squeezed[:, :, -1:], as_float((0, 0, 255)).expand(3, 6, 1), atol=0.05)

    tall = open_images(tmp_path, resolution=(12, 6)).images([0])[0]  # (H, W): no resize, 6 central columns
    assert tall.shape == (3, 12, 6) and torch.equal(tall, as_float((0, 255, 0)).expand(3, 12, 6))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    image = np.zeros((8, 16, 3), dtype=np.uint8)
    image[:, :8] = 255  # left half white: after the rotation, the top half
    Image.fromarray(image).save(tmp_path / "phone.png", exif=exif)
    data = open_images(tmp_path)
    assert (data.height, data.width) == (16, 8)
    pixels = data.images([0])[0]
    assert torch.equal(pixels[:, :8], torch.ones(3, 8, 8)) and torch.equal(pixels[:, 8:], -torch.ones(3, 8, 8))


def test_own_size_needs_one_size_and_flips_are_per_item(tmp_path):
    save(tmp_path / "a.png", three_bands())
    save(tmp_path / "b.png", three_bands())
    data = open_images(tmp_path)
    assert (data.height, data.width) == (12, 24)
    plain = data.images([0, 1])
    flipped = data.images([0, 1], flips=torch.tensor([True, False]))
    assert torch.equal(flipped[0], plain[0].flip(-1)) and torch.equal(flipped[1], plain[1])
    assert torch.equal(data.images([0]), plain[:1])  # the cached copy was not flipped in place
    save(tmp_path / "c.png", three_bands(12, 18))
    with pytest.raises(DataError, match=r"different sizes \(a.png is 24x12, c.png is 18x12\); set data.resolution"):
        open_images(tmp_path)
    assert open_images(tmp_path, resolution=8).images([2]).shape == (1, 3, 8, 8)


def test_channel_count_mismatch_names_both_counts(tmp_path):
    save(tmp_path / "grey" / "a.png", solid((100,)))
    save(tmp_path / "colour" / "a.png", solid((1, 2, 3)))
    with pytest.raises(DataError, match=r"have 1 channel \(mode L\) but the teacher takes 3") as info:
        open_images(tmp_path / "grey", channels=3)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"have 3 channels \(mode RGB\) but the teacher takes 1"):
        open_images(tmp_path / "colour", channels=1)
    assert open_images(tmp_path / "grey", channels=1).images([0]).shape == (1, 1, 8, 8)


def test_rgba_palette_and_16_bit_images_convert_within_their_channel_count(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).convert("P").save(tmp_path / "palette.gif")
    Image.new("L", (8, 8), 40).save(tmp_path / "grey.png")  # grey in a colour folder: expanded to RGB
    data = open_images(tmp_path, channels=3)
    images = data.images(range(3))  # grey.png, palette.gif, rgba.png
    assert torch.equal(images[0], as_float((40, 40, 40)).expand(3, 8, 8))
    assert torch.equal(images[1], as_float((0, 255, 0)).expand(3, 8, 8))
    assert torch.equal(images[2], as_float((255, 0, 0)).expand(3, 8, 8))
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    deep = ImageFolderDataset(tmp_path, channels=3).images([0])  # 16-bit white stays white
    assert torch.equal(deep[0], torch.ones(3, 8, 8))


# --- unreadable files ---------------------------------------------------------------------------


def png_bytes(colour=(5, 6, 7), size=(8, 8)):
    buffer = io.BytesIO()
    Image.fromarray(solid(colour, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_jpeg():
    """A JPEG cut in half: its header passes PIL's verify(), decoding it fails."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def test_unreadable_files_are_skipped_counted_and_summarised(tmp_path):
    save(tmp_path / "good1.png", solid((1, 1, 1)))
    save(tmp_path / "good2.png", solid((2, 2, 2)))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "half.png").write_bytes(png_bytes()[:40])
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    data = open_images(tmp_path)
    assert len(data) == 2
    assert [name for name, _ in data.skipped] == ["empty.png", "half.png", "text.jpg"]
    assert dict(data.skipped)["empty.png"] == "cannot identify image file"
    assert data.summary().endswith("; 3 unreadable files skipped (empty.png, half.png, text.jpg)")
    assert torch.equal(data.images([1])[0], as_float((2, 2, 2)).expand(3, 8, 8))


def test_folders_without_readable_images_are_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.png").write_bytes(png_bytes()[:40])
    (bad / "c.jpg").write_text("text")
    with pytest.raises(DataError, match=r"holds no readable images \(3 unreadable: a.png: cannot identify image file, b.png: "):
        open_images(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no readable images"):
        open_images(tmp_path / "empty")


def test_a_file_that_fails_to_decode_is_replaced_by_the_next_readable_one(tmp_path):
    save(tmp_path / "a.png", solid((10, 10, 10), (96, 96)))
    (tmp_path / "b.jpg").write_bytes(truncated_jpeg())
    save(tmp_path / "c.png", solid((30, 30, 30), (96, 96)))
    (tmp_path / "d.jpg").write_bytes(truncated_jpeg())
    data = open_images(tmp_path)
    assert len(data) == 4 and data.skipped == []  # headers are fine
    with pytest.warns(RuntimeWarning, match="cannot decode b.jpg"):
        images = data.images([1, 3, 0, 2])
    assert torch.equal(images[0], images[3])  # b.jpg -> c.png
    assert torch.equal(images[1], images[2])  # d.jpg -> wraps to a.png
    assert [name for name, _ in data.skipped] == ["b.jpg", "d.jpg"]
    assert "truncated" in data.skipped[0][1]
    with pytest.warns(RuntimeWarning, match="cannot decode b.jpg"):
        again = ImageFolderDataset(tmp_path, cache_bytes=0).images([1, 3])  # no cache: same substitutes again
    assert torch.equal(again, images[:2])
    assert len(data.skipped) == 2


def test_without_verify_unreadable_files_stay_and_are_substituted(tmp_path):
    save(tmp_path / "a.png", solid((10, 10, 10)))
    (tmp_path / "b.png").write_bytes(b"")
    save(tmp_path / "c.png", solid((30, 30, 30)))
    data = open_images(tmp_path, verify=False)
    assert len(data) == 3 and data.skipped == [("b.png", "cannot identify image file")]  # found by the probe
    assert torch.equal(data.images([1]), data.images([2]))


# --- the cache ----------------------------------------------------------------------------------


def test_decoded_images_are_cached_up_to_the_byte_cap(tmp_path, monkeypatch):
    for i in range(4):
        save(tmp_path / f"{i}.png", solid((i, i, i)))
    decoded = []
    original = ImageFolderDataset._open
    monkeypatch.setattr(ImageFolderDataset, "_open", lambda self, index: decoded.append(index) or original(self, index))
    data = ImageFolderDataset(tmp_path)
    data.images([0, 1, 2, 3])
    data.images([3, 2, 1, 0])
    assert decoded == [0, 1, 2, 3]
    capped = ImageFolderDataset(tmp_path, cache_bytes=2 * 3 * 8 * 8)  # two uint8 images
    decoded.clear()
    capped.images([0, 1, 2, 0])
    assert decoded == [0, 1, 2, 0]  # 0 was evicted by 2


# --- `datasets` datasets ------------------------------------------------------------------------


def pixel_rows(count, size=(6, 5)):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def to_float(array):
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0


def test_saved_dataset_with_captions_reads_the_source_pixels(tmp_path):
    rows = pixel_rows(3)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"), "id": datasets.Value("int32")})
    source = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in rows], "text": ["x", "y", "z"], "id": [7, 8, 9]},
                                        features=features)
    source.save_to_disk(tmp_path / "saved")
    data = open_images(tmp_path / "saved", channels=3)
    assert isinstance(data, HFImageDataset)
    assert (data.kind, len(data), data.height, data.width) == ("text", 3, 6, 5)
    assert data.cache_files  # memory-mapped from the Arrow file
    for i in (2, 0):
        assert torch.equal(data.images([i])[0], to_float(rows[i]))
    assert data.captions([2, 0, 2]) == ["z", "x", "z"]
    assert data.summary() == f"datasets directory {tmp_path / 'saved'}: 3 images, captioned, 3x6x5"
    with pytest.raises(DataError, match="no column 'caption'.*columns: image, text, id"):
        open_images(tmp_path / "saved", caption_column="caption")


def test_saved_dataset_dict_with_class_labels_and_splits(tmp_path):
    rows = pixel_rows(4)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee", "cow"])})

    def split(start, stop):
        return datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in rows[start:stop]], "label": [2, 0, 1, 2][start:stop]},
                                          features=features)

    datasets.DatasetDict({"train": split(0, 3), "test": split(3, 4)}).save_to_disk(tmp_path / "dd")
    train = open_images(tmp_path / "dd")
    assert (train.kind, train.class_names, len(train)) == ("class", ["ant", "bee", "cow"], 3)
    assert train.labels([1, 0]).tolist() == [0, 2]
    assert torch.equal(train.images([1, 2]), torch.stack([to_float(rows[1]), to_float(rows[2])]))
    test = open_images(tmp_path / "dd", split="test", resolution=4)
    assert torch.equal(test.labels([0]), torch.tensor([2])) and test.images([0]).shape == (1, 3, 4, 4)
    assert "(split test)" in test.source
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        open_images(tmp_path / "dd", split="validation")


def test_named_columns_of_encoded_bytes_and_integer_labels(tmp_path):
    rows = pixel_rows(3)
    blobs = []
    for array in rows:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    source = datasets.Dataset.from_dict({"png": blobs, "digit": [4, 0, 2], "text": ["a", "b", "c"]})
    data = HFImageDataset(source, image_column="png", label_column="digit")
    assert (data.kind, data.class_names, data.labels([0, 2]).tolist()) == ("class", ["0", "1", "2", "3", "4"], [4, 2])
    assert torch.equal(data.images([1])[0], to_float(rows[1]))
    assert HFImageDataset(source, image_column="png").kind == "text"  # found captions win over nothing named
    with pytest.raises(DataError, match="no image column .*columns: png, digit, text"):
        HFImageDataset(source)
    with pytest.raises(DataError, match="captions or labels, not both"):
        HFImageDataset(source, image_column="png", label_column="digit", caption_column="text")


def test_a_folder_of_parquet_files_opens_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = pixel_rows(2)
    source = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in rows], "caption": ["one", "two"]},
                                        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    (tmp_path / "pq").mkdir()
    source.to_parquet(tmp_path / "pq" / "train.parquet")
    data = open_images(tmp_path / "pq")
    assert data.source.startswith("datasets.load_dataset") and data.kind == "text"
    assert data.captions([1]) == ["two"] and torch.equal(data.images([1])[0], to_float(rows[1]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("# nothing to load")
    with pytest.raises(DataError, match="is not an image folder .* and datasets.load_dataset cannot read it"):
        open_images(tmp_path / "other")
    with pytest.raises(DataError, match=r"notes.md: expected an image folder .*, or a .parquet/.json/.jsonl/.csv/.arrow file for datasets.load_dataset"):
        open_images(tmp_path / "other" / "notes.md")


def test_without_datasets_a_saved_dataset_asks_for_it(tmp_path, monkeypatch):
    datasets.Dataset.from_dict({"image": [Image.fromarray(pixel_rows(1)[0])]}).save_to_disk(tmp_path / "saved")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="needs the datasets package: pip install datasets"):
        open_images(tmp_path / "saved")


MEMORY_PROBE = """
import json, os, sys
from stepdistill.data import open_images
assert "datasets" not in sys.modules, "importing stepdistill.data must not import datasets"
import datasets

def memory():  # (resident, anonymous = resident - file-backed) bytes
    with open("/proc/self/statm") as f:
        _, resident, shared = (int(pages) * os.sysconf("SC_PAGE_SIZE") for pages in f.read().split()[:3])
    return resident, resident - shared

open_images(sys.argv[2]).images([0, 1])  # warm-up: pages in the library code the measure should not count
before = memory()
data = open_images(sys.argv[1])
images = data.images([0, len(data) // 2, len(data) - 1])
opened = memory()
materialised = datasets.load_from_disk(sys.argv[1], keep_in_memory=True)  # control: what a copy costs
copied = memory()
print(json.dumps({"rss": opened[0] - before[0], "anonymous": opened[1] - before[1], "copy_anonymous": copied[1] - opened[1],
                  "cache_files": len(data.cache_files), "rows": len(data)}))
"""


def test_opening_a_saved_dataset_keeps_it_memory_mapped(tmp_path):
    noise = Image.fromarray(np.random.default_rng(2).integers(0, 256, (188, 188, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG", compress_level=0)
    blob = buffer.getvalue()  # ~106 kB, as a typical photo of a training set
    rows = 1500
    datasets.Dataset.from_dict({"image": [{"bytes": blob, "path": None}] * rows},
                               features=datasets.Features({"image": datasets.Image()})).save_to_disk(tmp_path / "big")
    total = rows * len(blob)
    assert total > 150e6
    datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(size=(9, 9)), "path": None}] * 2},
                               features=datasets.Features({"image": datasets.Image()})).save_to_disk(tmp_path / "small")
    command = [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big"), str(tmp_path / "small")]
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    grown = json.loads(result.stdout.strip().splitlines()[-1])
    assert grown["rows"] == rows and grown["cache_files"] >= 1
    assert grown["copy_anonymous"] > 0.8 * total, grown  # the measure does see a materialised copy
    # Opening probes 16 rows and images() reads 3: with large page-cache folios each costs up to
    # 2 MB of mapped file pages, whatever the dataset's size; none of it is a private copy.
    assert grown["rss"] < 0.3 * total, grown
    assert grown["anonymous"] < 0.05 * total, grown


# --- registry -----------------------------------------------------------------------------------


def test_registered_names_open_with_the_options_their_factory_takes(monkeypatch):
    monkeypatch.setattr(registry, "_registry", {})
    received = {}

    def toy(resolution=None, channels=None):
        """Four grey squares."""
        received.update(resolution=resolution, channels=channels)
        size = resolution or 4
        return TensorImageDataset(torch.linspace(-1, 1, 4).reshape(4, 1, 1, 1).expand(4, 1, size, size).contiguous(),
                                  labels=torch.tensor([0, 1, 0, 1]), class_names=["even", "odd"], source="toy squares")

    register_dataset("toy-squares", toy, "four grey squares")
    assert registered_datasets()["toy-squares"] == "four grey squares"
    data = open_images("toy-squares", resolution=2, channels=1)
    assert received == {"resolution": 2, "channels": 1}
    assert (data.kind, data.num_classes, data.images([3]).shape) == ("class", 2, (1, 1, 2, 2))
    assert data.labels([1, 3]).tolist() == [1, 1]
    flipped = data.images([0, 1], flips=torch.tensor([True, False]))
    assert flipped.shape == (2, 1, 2, 2)
    with pytest.raises(DataError, match="have 1 channel.*takes 3"):
        open_images("toy-squares", channels=3)
    with pytest.raises(DataError, match="no such file or directory, and not a registered dataset name .*toy-squares"):
        open_images("no-such-dataset")


def test_plugins_register_lazily(tmp_path, monkeypatch):
    """A plugin module (entry point group stepdistill.plugins) registers its dataset when imported,
    and is imported only when a name is looked up."""
    from stepdistill import plugins

    (tmp_path / "toy_plugin.py").write_text(textwrap.dedent("""
        import torch
        from stepdistill.data import TensorImageDataset, register_dataset

        def make(**options):
            return TensorImageDataset(-torch.ones(2, 3, 4, 4), captions=["a", "b"], source="plugin")

        register_dataset("plugin-toy", make, "Two black images.")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint(name="toy", value="toy_plugin", group=plugins.GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point] if group == plugins.GROUP else [])
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(registry, "_registry", {})
    assert "toy_plugin" not in sys.modules
    data = open_images("plugin-toy", verify=False)
    assert "toy_plugin" in sys.modules and data.captions([1]) == ["b"]
    assert registered_datasets() == {"plugin-toy": "Two black images."}


# --- prompts ------------------------------------------------------------------------------------


def test_prompt_list_joins_inline_prompts_and_a_file(tmp_path):
    (tmp_path / "p.txt").write_text("a fox\n\n a hen \n")
    assert prompt_list(["a cat", "  ", ""], tmp_path / "p.txt") == ["a cat", "a fox", "a hen"]
    assert prompt_list(["a cat"], None) == ["a cat"]
    with pytest.raises(DataError, match="no prompts"):
        prompt_list([" "], None)
    with pytest.raises(DataError, match="prompts file not found"):
        prompt_list(["a cat"], tmp_path / "missing.txt")
    from stepdistill.evaluation import load_prompts as evaluation_load_prompts

    assert evaluation_load_prompts is load_prompts and issubclass(DataError, StepdistillError)


# --- tensor shards ------------------------------------------------------------------------------


def test_shards_round_trip_with_any_row_order(tmp_path):
    latents = torch.randn(19, 2, 3).half()
    labels = torch.arange(19) * 10
    with ShardWriter(tmp_path / "cache", shard_rows=7, metadata={"teacher": "tiny"}) as writer:
        for start, stop in ((0, 5), (5, 8), (8, 18), (18, 19)):
            writer.add(latents=latents[start:stop], labels=labels[start:stop])
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [7, 7, 5] and index["num_rows"] == 19
    assert index["keys"] == {"latents": {"shape": [2, 3], "dtype": "float16"}, "labels": {"shape": [], "dtype": "int64"}}
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    cache = ShardedTensors(tmp_path / "cache")
    assert (len(cache), cache.keys, cache.metadata, cache.shape("latents")) == (19, ["latents", "labels"], {"teacher": "tiny"}, (19, 2, 3))
    order = torch.tensor([18, 0, 7, 6, 6, 13, 14, 3, 18])
    assert torch.equal(cache.get("latents", order), latents[order])
    assert torch.equal(cache.get("labels", order.tolist()), labels[order])
    assert cache.get("latents", []).shape == (0, 2, 3)
    with pytest.raises(IndexError):
        cache.get("labels", [19])
    with pytest.raises(ValueError, match="earlier rows have"):
        with ShardWriter(tmp_path / "mixed") as writer:
            writer.add(latents=latents[:2])
            writer.add(latents=latents[:2].float())
    with pytest.raises(DataError, match="already exists"):
        ShardWriter(tmp_path / "cache")


def test_a_legacy_single_file_reads_as_one_shard(tmp_path):
    latents, index = torch.randn(5, 4, 2, 2), torch.tensor([0, 1, 1, 0, 2])
    save_file({"latents": latents, "prompt_index": index}, tmp_path / "real.safetensors", metadata={"note": "old"})
    cache = ShardedTensors(tmp_path / "real.safetensors")
    assert (len(cache), sorted(cache.keys), cache.metadata) == (5, ["latents", "prompt_index"], {"note": "old"})
    assert torch.equal(cache.get("latents", [4, 1]), latents[[4, 1]])
    assert torch.equal(cache.get("prompt_index", [2, 2]), index[[2, 2]])
    save_file({"a": torch.zeros(3), "b": torch.zeros(4)}, tmp_path / "ragged.safetensors")
    with pytest.raises(DataError, match="share their first dimension"):
        ShardedTensors(tmp_path / "ragged.safetensors")


def test_an_exception_inside_the_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="encoder broke"):
        with ShardWriter(tmp_path / "cache", shard_rows=2) as writer:
            writer.add(latents=torch.zeros(5, 2))  # two shards already written
            raise RuntimeError("encoder broke")
    assert os.listdir(tmp_path) == []


def test_get_reads_only_the_rows_asked_for(tmp_path, monkeypatch):
    rows = torch.arange(40 * 8, dtype=torch.float32).reshape(40, 8)
    with ShardWriter(tmp_path / "cache", shard_rows=16) as writer:
        writer.add(x=rows)
    reads = []
    real_safe_open = shards.safe_open

    class Spy:
        def __init__(self, path, framework):
            self.file, self.name = real_safe_open(path, framework=framework), Path(path).name

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, key):
            raise AssertionError("get() must not load a whole tensor")

        def get_slice(self, key):
            real, name = self.file.get_slice(key), self.name

            class Slice:
                def __getitem__(self, item):
                    reads.append((name, item.start, item.stop))
                    return real[item]

            return Slice()

    monkeypatch.setattr(shards, "safe_open", Spy)
    cache = ShardedTensors(tmp_path / "cache")
    got = cache.get("x", [33, 3, 4, 5, 15, 16, 5])
    assert torch.equal(got, rows[[33, 3, 4, 5, 15, 16, 5]])
    assert reads == [("shard-00000.safetensors", 3, 6), ("shard-00000.safetensors", 15, 16),
                     ("shard-00001.safetensors", 0, 1), ("shard-00002.safetensors", 1, 2)]


def test_write_latent_cache_stores_latents_and_conditions_by_kind(tmp_path):
    images = torch.rand(5, 3, 4, 4) * 2 - 1
    captions = ["a cat", "a dog", "a cat", "a cow", "a dog"]
    text = TensorImageDataset(images, captions=captions)
    encode = lambda x: torch.nn.functional.avg_pool2d(x, 2)  # noqa: E731 - a stand-in VAE: [B, 3, 2, 2]
    path = write_latent_cache(encode, text, tmp_path / "text", batch_size=2, shard_rows=3, progress=False,
                              encode_conditions=lambda c: {"caption_length": torch.tensor([len(s) for s in c])})
    cache = ShardedTensors(path)
    assert torch.equal(cache.get("latents", range(5)), encode(images))
    assert cache.metadata["captions"] == ["a cat", "a dog", "a cow"]
    assert [cache.metadata["captions"][i] for i in cache.get("caption_index", range(5))] == captions
    assert cache.get("caption_length", [3]).tolist() == [5]
    assert cache.metadata["kind"] == "text" and cache.metadata["image_shape"] == [3, 4, 4]

    labelled = TensorImageDataset(images, labels=torch.tensor([1, 0, 1, 1, 0]), class_names=["a", "b"])
    cache = ShardedTensors(write_latent_cache(encode, labelled, tmp_path / "class", progress=False))
    assert cache.get("labels", range(5)).tolist() == [1, 0, 1, 1, 0] and cache.metadata["class_names"] == ["a", "b"]


# --- the layer rule -----------------------------------------------------------------------------


def test_the_data_layer_imports_nothing_above_it():
    allowed = {"stepdistill.errors", "stepdistill.config", "stepdistill.plugins"}
    for path in DATA_PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ["stepdistill", "data"][: 2 - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom):
                module = node.module
            elif isinstance(node, ast.Import):
                module = ",".join(alias.name for alias in node.names)
            else:
                continue
            for name in module.split(","):
                if name.startswith("stepdistill") and not name.startswith("stepdistill.data"):
                    assert name in allowed, f"{path.name} imports {name}"
