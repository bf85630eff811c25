"""Image sources for stage 1: an ImageNet-style folder or WebDataset tars of images.

Data flow: --data --open_source--> a sorted, indexed list of images (key, label, where its bytes
are) --read_bytes--> views.load_source (decode_image: RGB PIL image, or torchvision's JPEG decode) --> views.py.

The list is sorted and fixed before any work, so image index i means the same file on every rank
and on every re-run; that is what makes shards resumable and rank-independent.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand
from PIL import Image, UnidentifiedImageError

from tec_cache.format.remote import RemoteError, download, is_remote

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_TAR_IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
# Images above this many pixels are refused as decompression bombs (PIL's own default is ~89 MP
# with a warning only); 1.5e8 still admits any real photograph.
MAX_IMAGE_PIXELS = 150_000_000
DATA_CACHE_ENV = "TEC_DATA_CACHE"
# What --data takes, wherever it is an option (tec-cache build, tec-train run online and --objective mae).
SOURCE_HELP = ("ImageNet-style folder, folder of WebDataset .tar shards, or tar URLs (http(s)://, s3://, ...; brace "
               "notation train-{000000..001281}.tar; downloaded once into $TEC_DATA_CACHE).")


class BadImage(ValueError):
    """A source file that cannot be turned into an RGB image; the message names it."""


@dataclass(frozen=True)
class SourceItem:
    key: str
    label: int
    path: str
    offset: int = -1  # byte offset of the member's data inside a tar; -1 for plain files
    size: int = -1


@dataclass
class ImageSource:
    """A fixed, sorted list of images with labels (-1 when unknown)."""

    root: str
    kind: str
    items: list[SourceItem]
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def read_bytes(self, index: int) -> bytes:
        item = self.items[index]
        with open(item.path, "rb") as f:
            if item.offset < 0:
                return f.read()
            f.seek(item.offset)
            return f.read(item.size)

    def describe(self) -> dict:
        return {"path": self.root, "kind": self.kind, "num_images": len(self.items), "classes": self.classes}


def _open_checked(data: bytes, where: str) -> Image.Image:
    """PIL's lazy open (header only) with the empty-file and pixel-count checks."""
    if not data:
        raise BadImage(f"{where}: empty file")
    img = Image.open(io.BytesIO(data))
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise BadImage(f"{where}: {img.width}x{img.height} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
    return img


@contextlib.contextmanager
def _naming(where: str) -> Iterator[None]:
    """PIL's many exception types for broken files, as one BadImage naming ``where``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"{where}: refused as a decompression bomb ({e})") from e
        except UnidentifiedImageError as e:
            # PIL's own message embeds a memory address; keep the error reproducible.
            raise BadImage(f"{where}: not a recognised image format") from e
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            raise BadImage(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e


def check_image_header(data: bytes, where: str) -> str:
    """The file's format as PIL names it ("JPEG", "PNG", ...), after the checks ``decode_image``
    makes before decoding (empty, unrecognised, too many pixels); reads the header only."""
    with _naming(where):
        return str(_open_checked(data, where).format)


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode and convert any mode (L, P, RGBA, CMYK, I;16, ...) to RGB; BadImage names ``where``."""
    with _naming(where):
        img = _open_checked(data, where)
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit and float greyscale: scale to 8 bits before RGB, else convert() clips.
            img = img.point(lambda v: v / 256).convert("L") if img.mode.startswith("I;16") else img.convert("L")
        return img.convert("RGB")


def open_source(path: Path | str) -> ImageSource:
    """An image folder (class subfolders, or images directly inside) or WebDataset tar(s), local or
    given as URLs (``remote_tars``)."""
    if is_remote(path):
        return _tar_source(str(path), remote_tars(str(path)))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data: no such file or folder {path}")
    if path.is_file():
        if not path.name.endswith(".tar"):
            raise ValueError(f"--data: {path} is a file but not a .tar WebDataset shard")
        return _tar_source(str(path), [path])
    tars = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".tar"))
    if tars:
        return _tar_source(str(path), tars)
    return _folder_source(path)


def data_dir_for(ref: str) -> Path:
    """Where the tars of a ``--data`` URL are kept: ``$TEC_DATA_CACHE`` (default ~/.cache/tec-data),
    one folder per URL pattern."""
    base = Path(os.environ.get(DATA_CACHE_ENV, "~/.cache/tec-data")).expanduser()
    return base / hashlib.sha256(ref.encode("utf-8")).hexdigest()[:16]


def remote_tars(ref: str) -> list[Path]:
    """The WebDataset tars of a ``--data`` URL pattern (WebDataset's brace notation,
    ``https://host/train-{000000..001281}.tar``), each downloaded once into ``data_dir_for(ref)`` and
    read from there: a source is indexed for random access, which a stream does not give."""
    urls = list(braceexpand(ref))
    wrong = [u for u in urls if not u.split("?")[0].endswith(".tar")]
    if wrong:
        raise ValueError(f"--data: {wrong[0]} is not a .tar URL (a URL --data names WebDataset tar shards of images)")
    where = data_dir_for(ref)
    names = [u.split("?")[0].rsplit("/", 1)[-1] for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"--data: {ref} names two tars with the same file name")
    try:
        return [download(u, where / name) for u, name in zip(urls, names)]
    except RemoteError as e:
        raise ValueError(f"--data: {e}") from None


def _folder_source(root: Path) -> ImageSource:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[SourceItem] = []
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            items.append(SourceItem(f.name, -1, str(f)))
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
                items.append(SourceItem(f.relative_to(root).as_posix(), label, str(f)))
    if not items:
        raise ValueError(f"--data: {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")
    items.sort(key=lambda it: it.key)
    return ImageSource(str(root), "folder", items, classes)


def _tar_source(root: str, tars: list[Path]) -> ImageSource:
    items: list[SourceItem] = []
    for tar_path in tars:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(tar_path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    prefix = m.name[: len(m.name) - len(base)]
                    stem, _, suffix = base.partition(".")
                    members.setdefault(prefix + stem, {})[suffix.lower()] = m
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"--data: {tar_path} is not a readable tar ({e})") from e
        for key, parts in members.items():
            img = next((parts[s] for s in _TAR_IMAGE_SUFFIXES if s in parts), None)
            if img is None:
                continue
            label = -1
            if "cls" in parts:
                with open(tar_path, "rb") as f:
                    f.seek(parts["cls"].offset_data)
                    text = f.read(parts["cls"].size).decode("utf-8", "replace").strip()
                label = int(text) if text.lstrip("-").isdigit() else -1
            items.append(SourceItem(f"{tar_path.name}/{key}", label, str(tar_path), img.offset_data, img.size))
    if not items:
        raise ValueError(f"--data: the tar shards under {root} hold no images")
    items.sort(key=lambda it: it.key)
    labels = sorted({it.label for it in items if it.label >= 0})
    return ImageSource(root, "webdataset", items, [str(c) for c in labels])
