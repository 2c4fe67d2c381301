"""One image reader for every dataset, the shared resize-and-pad, and the on-disk cache of its output.

`read_image` turns JPG/PNG (8 or 16 bit, L/RGB/RGBA) and DICOM (any bit depth, modality LUT, VOI LUT or
window, MONOCHROME1 inverted) into a 2-D uint8 array where bright means dense, as radiologists view it.
`ImageCache` stores the resized square per (file, file size, mtime, target size, reader version), so the
second epoch and the second run decode no JPEG or DICOM at all.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from bench.core.errors import UserError
from bench.core.progress import note

READER_VERSION = 1  # bump when decoding or resizing changes, so stale cache entries are never read
DICOM_SUFFIXES = (".dcm", ".dicom")
DECODE_NOTE_AT = 500  # uncached images worth a line before they are decoded (about ten seconds' work or more)


class UnreadableImage(UserError):
    """A missing, truncated or undecodable image file; the message names the file."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / max(hi - lo, 1e-6) * 255.0 + 0.5).astype(np.uint8)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("no PixelData element")
    arr = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3:  # RGB/YBR secondary captures: luminance
        arr = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        photometric = "MONOCHROME2"
    else:
        arr = apply_modality_lut(arr, ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            arr = apply_voi_lut(arr, ds, index=0)
    out = _to_uint8(arr)
    return 255 - out if photometric == "MONOCHROME1" else out


def pil_to_gray(im: Image.Image) -> np.ndarray:
    """A PIL image (8 or 16 bit, L/RGB/RGBA/P) as the 2-D uint8 array `read_image` gives for its file."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_uint8(np.asarray(im))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))  # transparent pixels read as black, not white
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("L"))


def array_to_gray(arr: np.ndarray) -> np.ndarray:
    """A 2-D array of any numeric type as a 2-D uint8 array: uint8 as it is, anything else (16-bit, float, bool)
    stretched over 0-255 as a 16-bit file's pixels are."""
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {tuple(arr.shape)}")
    return arr if arr.dtype == np.uint8 else _to_uint8(arr)


def _read_pil(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return pil_to_gray(im)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with path.open("rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM"


def read_image(path: str | Path) -> np.ndarray:
    """The image at `path` as a 2-D uint8 array (bright = dense), or UnreadableImage naming the file."""
    path = Path(path)
    try:
        return _read_dicom(path) if _is_dicom(path) else _read_pil(path)
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: image file not found") from None
    except Exception as exc:  # every decoder failure is the file's fault here; say which file and why
        raise UnreadableImage(f"{path}: cannot be decoded as an image ({type(exc).__name__}: {exc})") from None


def files_sha256(paths: Sequence[str | Path]) -> str:
    """Identifies the files the paths name as they are now: each one's absolute path, size and modification
    time, and the reader's version (the identity the image cache keys its entries by). A file replaced or
    edited in place, or the same names under another root, give another digest; reading no file's content
    keeps this to one stat per image."""
    digest = hashlib.sha256(f"reader {READER_VERSION}\n".encode())
    for path in paths:
        try:
            st = os.stat(path)
            digest.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{os.path.abspath(path)}|missing\n".encode())
    return digest.hexdigest()


def square_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized rows, resized columns, top pad, left pad) of `resize_and_pad` for an image of that shape (finding
    masks reach the patch grid through the same numbers: bench/data/finding_masks.py)."""
    scale = size / max(height, width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def resize_and_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Longer side to `size` keeping the aspect ratio (area-averaged when shrinking), then zero-pad to a
    centred square, as GLoRIA/MGCA do."""
    h, w = img.shape
    nh, nw, top, left = square_geometry(h, w, size)
    resample = Image.BOX if max(h, w) > size else Image.BILINEAR
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), resample))
    out = np.zeros((size, size), np.uint8)
    out[top:top + nh, left:left + nw] = resized
    return out


class ImageCache:
    """Resized squares on disk, one raw uint8 file per (file, size, mtime, target size, reader version).

    Entries are written to a temporary name and renamed, so parallel workers and killed runs never leave a
    partial entry; a changed source file gets a new key. `directory=None` decodes every time.
    """

    def __init__(self, directory: str | Path | None, size: int):
        self.directory = None if directory is None else Path(directory).expanduser()
        self.size = size

    def entry(self, path: str | Path) -> Path:
        st = os.stat(path)
        key = f"{READER_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{self.size}"
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.directory / f"{self.size}px" / digest[:2] / digest[2:]

    def _entry_or_error(self, path: str | Path) -> Path:
        try:
            return self.entry(path)
        except FileNotFoundError:
            raise UnreadableImage(f"{path}: image file not found") from None
        except OSError as exc:
            raise UnreadableImage(f"{path}: cannot be read ({exc.strerror or exc})") from None

    def cached(self, path: str | Path) -> bool:
        """Whether `path`'s square is in the cache (two stats, no image I/O); False where it cannot be told."""
        try:
            return self.entry(path).stat().st_size == self.size * self.size
        except OSError:
            return False

    def check(self, path: str | Path) -> None:
        """Make sure `path` is cached (decoding it if not); UnreadableImage if it cannot be. A cached
        entry is only stat'ed, so checking a warm cache costs no image I/O."""
        if self.directory is None or not self.cached(path):
            self.get(path)  # a missing or unreadable source file is named by get's UnreadableImage

    def get(self, path: str | Path) -> np.ndarray:
        if self.directory is None:
            return resize_and_pad(read_image(path), self.size)
        entry = self._entry_or_error(path)
        try:
            return np.fromfile(entry, np.uint8).reshape(self.size, self.size)
        except (OSError, ValueError):  # not cached yet (or a cache that cannot be read: decode)
            square = resize_and_pad(read_image(path), self.size)
            tmp = None
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(square.tobytes())
                os.replace(tmp, entry)
            except OSError as exc:  # a full or read-only cache slows the run down; it must not stop it
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)
                print(f"bench: image cache {self.directory} is not writable ({exc}); decoding every time",
                      file=sys.stderr)
                self.directory = None
            return square


def _check(args: tuple[ImageCache, list[str]]) -> list[str | None]:
    cache, paths = args
    errors: list[str | None] = []
    for p in paths:
        try:
            cache.check(p)
            errors.append(None)
        except UnreadableImage as exc:
            errors.append(str(exc))
    return errors


def decode_all(cache: ImageCache, paths: Sequence[str], workers: int = 0, what: str = "") -> list[str | None]:
    """Decode and cache every image not cached yet, in parallel; one error message or None per path. A batch
    of uncached images worth waiting for is announced first (`what` names them)."""
    paths = list(paths)
    if cache.directory is not None and len(paths) >= DECODE_NOTE_AT:
        uncached = sum(not cache.cached(p) for p in paths)
        if uncached >= DECODE_NOTE_AT:
            note(f"decoding {uncached} images of {what or 'a dataset'} into the image cache "
                 f"({max(workers, 1)} process(es); later runs read them from there)")
    if workers <= 1 or len(paths) < 64:
        return _check((cache, paths))
    chunk = max(16, len(paths) // (workers * 8))
    jobs = [(cache, paths[i:i + chunk]) for i in range(0, len(paths), chunk)]
    with ProcessPoolExecutor(workers) as pool:
        return [e for part in pool.map(_check, jobs) for e in part]


def usable(cache: ImageCache, paths: Sequence[str], policy: str, what: str, workers: int = 0) -> np.ndarray:
    """Boolean mask of readable images. Unreadable ones are counted and skipped (`skip`) or stop the run
    with the first file's message (`error`), before any epoch starts rather than in the middle of one."""
    errors = decode_all(cache, paths, workers, what)
    bad = [e for e in errors if e is not None]
    if bad and policy == "error":
        raise UnreadableImage(f"{bad[0]} ({len(bad)} unreadable image(s) in {what})")
    if bad:
        print(f"bench: skipped {len(bad)} unreadable image(s) in {what}; first: {bad[0]}", file=sys.stderr)
    return np.array([e is None for e in errors], dtype=bool)
