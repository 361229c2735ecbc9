"""Files and images every task reads: path/glob resolution and lazy, picklable image loaders.

A sample's images are decoded only when the engine asks for them (``Sample.images()``), so one missing or corrupt
image becomes a per-sample error record instead of a failed load of the whole benchmark. Every loader turns any
decoding failure into :class:`tasks.base.SampleError` carrying the sample's source (``file:line``).
"""

from __future__ import annotations

import glob
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from core.errors import UserError
from tasks.base import SampleError


class DataFileNotFoundError(UserError, FileNotFoundError):
    """A task's data file or glob matches nothing."""


def data_file(path: str | Path, what: str) -> Path:
    """The one file ``path`` names (:func:`resolve_files`' checks and messages)."""
    files = resolve_files(str(path), what)
    if len(files) > 1:
        raise DataFileNotFoundError(f"{what}: {str(path)!r} matches {len(files)} files; give one (task.data)")
    return files[0]


def check_image_root(image_root: str | Path | None) -> None:
    """A given ``image_root`` must be a folder: else every sample would fail on its image, after the model loads."""
    if image_root is not None and not Path(image_root).expanduser().is_dir():
        raise DataFileNotFoundError(
            f"task.image_root={str(image_root)!r} is not a folder; give the folder the image names are relative to"
        )


def decode_image(fp: Any, source: str, name: str) -> Image.Image:
    """Open, fully decode (``load``) and convert to RGB, turning every failure into :class:`SampleError`."""
    try:
        with Image.open(fp) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise SampleError(f"image not found: {name}", source) from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...).
        raise SampleError(f"cannot decode image: {name}: {type(exc).__name__}: {exc}", source) from exc


@dataclass(frozen=True)
class ImageFile:
    """Lazy loader of one image file (picklable, unlike a closure)."""

    path: str
    source: str

    def __call__(self) -> list[Image.Image]:
        """The decoded image, as a one-element list."""
        return [decode_image(self.path, self.source, self.path)]


@dataclass(frozen=True)
class ImageBytes:
    """Lazy decoder of one image embedded in a data file (e.g. a parquet cell)."""

    data: bytes = field(repr=False)
    name: str
    source: str

    def __call__(self) -> list[Image.Image]:
        """The decoded image, as a one-element list."""
        return [decode_image(io.BytesIO(self.data), self.source, self.name)]


class MalformedImageCell(ValueError):
    """A data-file image cell that holds neither bytes nor a path."""


def image_cell(value: Any, source: str, image_root: str | Path | None, cache: dict[bytes, bytes]) -> tuple[Any, str]:
    """The lazy image of a Hugging Face ``image`` cell and its path (``""`` when only bytes are stored).

    Args:
        value: A struct ``{bytes, path}``, raw bytes, or a path string.
        source: Where the row came from, for error messages.
        image_root: Directory a path-only cell is relative to (``None``: the path as given).
        cache: Shared by the rows of one file, so identical embedded images are stored once.

    Raises:
        MalformedImageCell: When the cell has neither bytes nor a path.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path") or ""
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), ""
    elif isinstance(value, str):
        data, path = None, value
    else:
        raise MalformedImageCell(f"field 'image' must be a struct of bytes/path, got {type(value).__name__}")
    if data:
        data = cache.setdefault(hashlib.blake2b(data, digest_size=16).digest(), data)
        return ImageBytes(data, path or "<embedded image>", source), path
    if path:
        return ImageFile(str(Path(image_root) / path) if image_root else path, source), path
    raise MalformedImageCell("field 'image' has neither bytes nor path")


def resolve_files(spec: str | Sequence[str], what: str) -> list[Path]:
    """Files matching one path or glob (or each of a list of them), in order, without repeats.

    Args:
        spec: A path, a glob pattern (``*?[``), or a list of them.
        what: What the files are, for the error message (e.g. ``"POPE question"``).

    Raises:
        FileNotFoundError: When a pattern matches nothing; the message names it.
    """
    files: list[Path] = []
    for pattern in [spec] if isinstance(spec, str) else list(spec):
        pattern = str(Path(pattern).expanduser())
        if any(ch in pattern for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
        else:
            found = [Path(pattern)] if Path(pattern).is_file() else []
        if not found and Path(pattern).is_dir():
            raise DataFileNotFoundError(f"{what} path {pattern!r} is a folder, not a file; give the file(s) (task.*)")
        if not found:
            raise DataFileNotFoundError(f"no {what} file matches {pattern!r}; check the task's data path (task.*)")
        files += [f for f in found if f not in files]
    return files
