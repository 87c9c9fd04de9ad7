"""The shapes data: deterministic procedural images, written atomically as a flat PNG folder."""

import pytest
from PIL import Image

from stepdistill.cli import main
from stepdistill.errors import StepdistillError
from stepdistill.shapes import data as shapes_data
from stepdistill.shapes import make_shapes


def _pngs(folder):
    return sorted(folder.glob("*.png"))


def test_make_shapes_writes_n_rgb_pngs_and_a_readme(tmp_path):
    out = make_shapes(tmp_path / "shapes", num_images=12, seed=3)
    files = _pngs(out)
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(12)]
    assert sorted(p.name for p in out.iterdir()) == sorted([f.name for f in files] + ["README.md"])  # flat: no sub-folders
    for path in files:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (16, 16)
    readme = (out / "README.md").read_text()
    assert "stepdistill data shapes" in readme and "--num-images 12 --seed 3 --size 16" in readme
    with Image.open(_pngs(make_shapes(tmp_path / "small", num_images=2, size=8))[0]) as image:
        assert image.size == (8, 8)


def test_same_seed_same_bytes_other_seed_other_images_and_image_i_depends_on_seed_and_i_only(tmp_path):
    a = make_shapes(tmp_path / "a", num_images=20, seed=0)
    b = make_shapes(tmp_path / "b", num_images=20, seed=0)
    assert [f.read_bytes() for f in _pngs(a)] == [f.read_bytes() for f in _pngs(b)]
    first_five = make_shapes(tmp_path / "five", num_images=5, seed=0)
    assert [f.read_bytes() for f in _pngs(first_five)] == [f.read_bytes() for f in _pngs(a)[:5]]
    other = make_shapes(tmp_path / "other", num_images=20, seed=1)
    pixels = {Image.open(f).tobytes() for f in _pngs(a) + _pngs(other)}
    assert len(pixels) == 40  # no image repeats, within a seed or across the two


def test_a_non_empty_folder_is_refused_unless_overwrite(tmp_path):
    folder = tmp_path / "shapes"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    with pytest.raises(StepdistillError, match="not empty"):
        make_shapes(folder, num_images=3)
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]
    make_shapes(folder, num_images=3, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "00002.png", "README.md"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(_pngs(make_shapes(empty, num_images=2))) == 2  # an empty folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "shapes"]  # no temporary folders left


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    folder = tmp_path / "shapes"
    if existing:
        make_shapes(folder, num_images=2, seed=5)
    before = {p.name: p.read_bytes() for p in folder.iterdir()} if existing else None
    drawn = []
    real_image = shapes_data.shapes_image

    def interrupted_after_four(seed, index, size=16):
        if len(drawn) == 4:
            raise KeyboardInterrupt
        drawn.append(index)
        return real_image(seed, index, size)

    monkeypatch.setattr(shapes_data, "shapes_image", interrupted_after_four)
    with pytest.raises(KeyboardInterrupt):
        make_shapes(folder, num_images=10, overwrite=True)
    assert drawn == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == (["shapes"] if existing else [])
    if existing:  # the folder that was there is untouched
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_data_shapes_cli(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", str(out), "--num-images", "3", "--seed", "2", "--size", "8"]) == 0
    assert len(_pngs(out)) == 3 and "written to" in capsys.readouterr().out
    assert main(["data", "shapes", str(out), "--num-images", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"stepdistill data: error: output directory {out} is not empty (pass overwrite=True / --overwrite to replace it)"]
