"""Packing a split list's images into one compact HDF5 file, resumably.

``encoded`` stores each image file's bytes unchanged (variable-length uint8: about the size of the
JPEGs); ``rgb`` stores decoded pixels resized to ``size`` x ``size`` (N, size, size, 3) uint8. Never float.
Progress is committed every ``chunk`` images into ``<file>.partial``; rerunning the same command resumes
there, and the finished file is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from dmg.data.images import BadImageError, read_image
from dmg.data.lists import read_split_list
from dmg.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Packed:
    """What a packing run stored and skipped."""

    path: Path
    stored: int
    skipped: list[str] = field(default_factory=list)


def pack_list(
    list_path: Path,
    images_root: Path,
    out: Path,
    encoding: str = "encoded",
    size: int = 256,
    skip_bad_images: bool = False,
    chunk: int = 512,
    progress: bool = True,
) -> Packed:
    """Pack the images of ``list_path`` (paths relative to ``images_root``) into the HDF5 file ``out``."""
    if encoding not in ("encoded", "rgb"):
        raise UserError(f"pack encoding must be 'encoded' or 'rgb', got {encoding!r}")
    if out.exists():
        return Packed(out, _stored(out))
    names, labels = read_split_list(list_path)
    partial = out.with_name(out.name + ".partial")
    signature = hashlib.sha256(list_path.read_bytes() + f"{encoding}:{size}".encode()).hexdigest()
    with _open_partial(partial, signature, len(names), encoding, size) as file:
        skipped = _fill(file, names, labels.numpy(), images_root, skip_bad_images, chunk, progress, out.name)
        stored = int(file.attrs["stored"])
        for key in ("images", "labels", "paths"):
            file[key].resize(stored, axis=0)
        file.attrs["complete"] = True
    partial.replace(out)
    return Packed(out, stored, skipped)


def _open_partial(partial: Path, signature: str, count: int, encoding: str, size: int) -> h5py.File:
    """The partial file to continue, or a fresh one when there is none or it belongs to other inputs."""
    try:
        file = h5py.File(partial, "a")
        if file.attrs.get("signature") == signature:
            log.info("resuming %s at image %d of %d", partial, file.attrs["done"], count)
            return file
        file.close()
    except OSError:
        log.warning("%s is unreadable (interrupted while writing?): starting it afresh", partial)
    partial.unlink(missing_ok=True)
    file = h5py.File(partial, "w")
    pixels = (
        dict(shape=(count,), dtype=h5py.vlen_dtype(np.uint8))
        if encoding == "encoded"
        else dict(shape=(count, size, size, 3), dtype=np.uint8, chunks=(1, size, size, 3))
    )
    file.create_dataset("images", maxshape=(None, *pixels["shape"][1:]), **pixels)
    file.create_dataset("labels", shape=(count,), maxshape=(None,), dtype=np.int64)
    file.create_dataset("paths", shape=(count,), maxshape=(None,), dtype=h5py.string_dtype())
    file.attrs.update(signature=signature, encoding=encoding, done=0, stored=0, skipped=0, complete=False)
    return file


def _fill(
    file: h5py.File,
    names: list[str],
    labels: np.ndarray,
    images_root: Path,
    skip_bad_images: bool,
    chunk: int,
    progress: bool,
    label: str,
) -> list[str]:
    """Store images ``done ..`` of the list, committing every ``chunk``; returns the names skipped now."""
    reader = _read_encoded if file.attrs["encoding"] == "encoded" else _reader_rgb(file["images"].shape[1])
    done, stored, skipped = int(file.attrs["done"]), int(file.attrs["stored"]), []
    bar = tqdm(total=len(names), initial=done, desc=label, unit="img", disable=None if progress else True)
    for index in range(done, len(names)):
        try:
            file["images"][stored] = reader(images_root / names[index])
        except BadImageError as error:
            if not skip_bad_images:
                raise
            log.warning("skipping %s", error)
            skipped.append(names[index])
        else:
            file["labels"][stored], file["paths"][stored] = labels[index], names[index]
            stored += 1
        bar.update()
        if (index + 1) % chunk == 0 or index + 1 == len(names):
            file.attrs.update(done=index + 1, stored=stored, skipped=int(file.attrs["skipped"]) + len(skipped))
            file.flush()
    bar.close()
    return skipped


def _read_encoded(path: Path) -> np.ndarray:
    """The file's bytes, after checking that they decode."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(f"cannot decode image {path}: {error}") from None
    return np.frombuffer(data, dtype=np.uint8)


def _reader_rgb(size: int):
    def read(path: Path) -> np.ndarray:
        return np.asarray(read_image(str(path)).resize((size, size), Image.Resampling.BILINEAR))

    return read


def _stored(path: Path) -> int:
    with h5py.File(path, "r") as file:
        return len(file["labels"])
