"""Files: atomic writes, PNG metadata that regenerates an image, labelled grids.

Every file is written under a temporary name in its folder and renamed into place, so an
interrupted run (Ctrl-C, a killed job) never leaves a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from multifusion.errors import RecipeError, clip

META_KEY = "multifusion"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on any error
    (KeyboardInterrupt included) delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file owner-only (0600); give it what a plain open() would (0666 less
    # the umask), so an atomic write is indistinguishable from a normal one.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it takes `path`'s place (a link or file
    there is replaced, never followed; an old folder is removed), on any error it is deleted. For
    writers that write a folder at once (diffusers' `save_pretrained`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; give it a plain mkdir's mode
    try:
        yield tmp
        old = None
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it and set it back
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_png(image: Image.Image, path: str | Path, metadata: dict | None = None) -> Path:
    """Save `image` as PNG atomically, with `metadata` as JSON in a text chunk."""
    info = PngImagePlugin.PngInfo()
    if metadata is not None:
        info.add_text(META_KEY, json.dumps(metadata, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_png_metadata(path: str | Path) -> dict:
    """The metadata `save_png` wrote, a JSON object; RecipeError when the file is not an image,
    has none, or holds something else."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            raw = im.info.get(META_KEY) if hasattr(im, "info") else None
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        raise RecipeError(f"{str(path)!r} is not a readable image ({type(err).__name__}: {clip(str(err))})") from None
    if raw is None:
        raise RecipeError(f"{str(path)!r} holds no multifusion metadata (was it written by `multifusion generate`?)")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise RecipeError(f"{str(path)!r}: its multifusion metadata is not JSON ({err})") from None
    except RecursionError:  # e.g. 100,000 nested brackets: no recipe nests that deep
        raise RecipeError(
            f"{str(path)!r}: its multifusion metadata nests too deeply to be a recipe; it was not written by "
            "`multifusion generate`"
        ) from None
    if not isinstance(meta, dict):
        raise RecipeError(f"{str(path)!r}: its multifusion metadata is a {type(meta).__name__}, not an object with a `recipe`")
    return meta


def image_is_whole(path: str | Path) -> bool:
    """Whether `path` is an image whose pixel data decodes completely (a truncated or damaged PNG
    does not): what a resumed run checks before keeping a finished image."""
    try:
        with Image.open(path) as im:
            im.verify()  # chunk checksums (PNG), without decoding
        with Image.open(path) as im:
            im.load()  # every pixel decodes
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def check_output_dir(where: str, path: str | Path) -> Path:
    """RecipeError naming `where` unless `path` is a folder this process can write in, or can be
    created as one: not a file, not under a file, and writable (a file is created and removed
    in it, or in its nearest existing parent: permission bits alone do not tell, e.g. as root
    or on a read-only file system). Creates nothing. Run it before any sampling, so no computed
    batch is lost to an unwritable folder."""
    path = Path(path)
    dangling = next((p for p in [path, *path.parents] if p.is_symlink() and not p.exists()), None)
    if dangling is not None:  # mkdir would fail on it after all the work (FileExistsError)
        raise RecipeError(
            f"{where}: {str(dangling)!r} is a symbolic link to something that does not exist; remove the link "
            "or choose another folder"
        )
    existing = next(p for p in [path, *path.parents] if p.exists() or p == Path(p.anchor) or str(p) == ".")
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {str(existing)!r}, which is a file"
        raise RecipeError(f"{where}: {str(path)!r} {what}, not a folder; choose a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RecipeError(
            f"{where}: cannot write in {str(existing)!r} ({err.strerror or err}); choose a writable folder"
        ) from None
    return path


def read_rgb_image(where: str, path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1] from an RGB (or greyscale) image file, resized to `size` (h, w)
    with bicubic filtering; RecipeError naming the recipe field `where` otherwise."""
    check_image_file(where, path)
    with Image.open(path) as im:
        if im.mode not in ("RGB", "L"):
            raise RecipeError(
                f"{where}: {str(path)!r} has mode {im.mode}; give an RGB image (e.g. convert it with PIL: im.convert('RGB'))"
            )
        im = im.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        arr = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size[0], size[1], 3)
    return arr.permute(2, 0, 1)[None].float() / 127.5 - 1


def check_image_file(where: str, path: str | Path) -> None:
    """RecipeError naming `where` unless `path` is an existing file that decodes as an image."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{where}: {str(path)!r} does not exist")
    if not image_is_whole(p):
        raise RecipeError(f"{where}: {str(path)!r} is not an image PIL can read (or it is damaged); give a PNG or JPEG file")


def grid(
    images: list[list[Image.Image]], row_labels: list[str], col_labels: list[str] | None = None, cell: int = 128
) -> Image.Image:
    """A labelled grid: one row per label, images scaled to `cell` pixels high keeping their
    aspect ratio (nearest neighbour, so small zoo images stay crisp); each column as wide as its
    widest image."""
    from PIL import ImageDraw

    def scaled(im: Image.Image) -> Image.Image:
        return im.convert("RGB").resize((max(1, round(cell * im.width / im.height)), cell), Image.NEAREST)

    rows = [[scaled(im) for im in row] for row in images]
    ncols = max((len(r) for r in rows), default=0)
    widths = [max((r[j].width for r in rows if j < len(r)), default=cell) for j in range(ncols)]
    lefts = [sum(widths[:j]) + 2 * j for j in range(ncols)]
    label_w = max(8 * max((len(s) for s in row_labels), default=0), 40)
    top = 16 if col_labels else 0
    canvas = Image.new("RGB", (label_w + sum(widths) + 2 * ncols, top + len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate((col_labels or [])[:ncols]):
        draw.text((label_w + lefts[j] + 2, 2), label, fill="black")
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + i * (cell + 2)
        draw.text((2, y + cell // 2 - 6), label, fill="black")
        for j, im in enumerate(row):
            canvas.paste(im, (label_w + lefts[j], y))
    return canvas


def file_fingerprint(path: str | Path, *, whole_below: int = 256 << 20) -> str:
    """Content hash of a file or a folder (names, sizes and bytes of every file; for files over
    ``whole_below`` bytes only the first and last MiB, so a multi-GB checkpoint costs nothing)."""
    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    )
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= whole_below:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]
