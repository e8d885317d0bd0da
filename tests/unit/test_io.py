import pytest
from PIL import Image

from multifusion.errors import RecipeError
from multifusion.io import atomic_path, read_png_metadata, save_png
from multifusion.provenance import image_metadata


def test_png_metadata_round_trip(tmp_path):
    meta = image_metadata('{"method": "single", "sampling": {"seed": 1, "num_images": 4}}', seed=3)
    assert meta["recipe"]["sampling"] == {"seed": 3, "num_images": 1}
    save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", meta)
    assert read_png_metadata(tmp_path / "x.png") == meta


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "out.png") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_png_without_metadata(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "plain.png")
    with pytest.raises(RecipeError, match="no multifusion metadata"):
        read_png_metadata(tmp_path / "plain.png")


def test_grid_keeps_each_image_aspect_and_sizes_columns_to_the_widest():
    from PIL import Image

    from multifusion.io import grid

    square, wide = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (160, 64), "blue")
    g = grid([[square, square], [wide, square]], ["a", "b"], cell=32)
    label_w = 40
    assert g.size == (label_w + 80 + 32 + 2 * 2, 2 * (32 + 2))  # no column labels: no top band
    assert g.getpixel((label_w + 79, 34 + 16)) == (0, 0, 255)  # the wide image spans its 80 px
    assert g.getpixel((label_w + 33, 16)) == (255, 255, 255)  # the square leaves the rest of the column blank
    assert g.getpixel((label_w + 82, 16)) == (255, 0, 0)  # the second column starts after the widest


def test_atomic_write_has_the_permissions_of_a_plain_write(tmp_path):
    import os

    from multifusion.io import write_text

    old = os.umask(0o022)
    try:
        (tmp_path / "plain.txt").write_text("x")
        write_text(tmp_path / "atomic.txt", "x")
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic.txt") == mode("plain.txt") == 0o644


def test_atomic_dir_replaces_a_planted_link_and_an_old_folder_and_leaves_nothing_on_error(tmp_path):
    from multifusion.io import atomic_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "aggregator").symlink_to(elsewhere)
    with atomic_dir(out / "aggregator") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not (out / "aggregator").is_symlink() and (out / "aggregator" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]  # the link's target is untouched
    with atomic_dir(out / "aggregator") as tmp:  # an old folder is replaced whole
        (tmp / "weights.bin").write_text("new")
    assert sorted(p.name for p in (out / "aggregator").iterdir()) == ["weights.bin"]
    with pytest.raises(RuntimeError), atomic_dir(out / "aggregator") as tmp:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed")
    assert sorted(p.name for p in (out / "aggregator").iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in out.iterdir()) == ["aggregator"]  # no temporary folder left
