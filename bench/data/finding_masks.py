"""Where findings were drawn: the synthetic generator's ground-truth sidecar, one beside each frontal image,
and the mapping of any finding mask onto the model's patch grid.

`<image without its last suffix>.findings.npz` (`view1_frontal.findings.npz`) holds one boolean array per
finding drawn in that image (keys are the finding names of `bench.data.synth.findings`, e.g. "Pleural
Effusion"; shape = the image file's rows and columns). An image without findings has a sidecar with no
arrays, so "no sidecar" (no ground truth) and "nothing drawn" stay apart. Real datasets carry the same
information in their own formats (SIIM's RLE masks, RSNA's boxes); their adapters read those
(`Adapter.finding_mask`).

A mask at the image file's resolution reaches the patch grid the way the image does: `resize_and_pad`'s
geometry (longer side to the input size, aspect kept, centred zero padding), then each patch's *coverage* is
the share of its area that lies on a finding (padding is never on one). A patch is *on a finding* when its
coverage is at least `COVERAGE_THRESHOLD`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from bench.core.errors import UserError
from bench.data.images import UnreadableImage, _is_dicom, square_geometry

SUFFIX = ".findings.npz"
# a patch is "on a finding" when at least this share of its area is: a quarter keeps patches that only graze a
# finding's edge out, and still counts a small nodule that straddles up to four patches in the one it fills most
COVERAGE_THRESHOLD = 0.25


def sidecar_path(image_path: str | Path) -> Path:
    path = Path(image_path)
    return path.with_suffix(SUFFIX) if path.suffix else path.with_name(path.name + SUFFIX)


def write_sidecar(image_path: str | Path, masks: dict[str, np.ndarray]) -> None:
    """Write the masks of the findings drawn in `image_path` (empty masks are left out)."""
    arrays = {name: np.asarray(mask, dtype=bool) for name, mask in masks.items() if np.any(mask)}
    with open(sidecar_path(image_path), "wb") as fh:
        np.savez_compressed(fh, **arrays)


def read_sidecar(image_path: str | Path) -> dict[str, np.ndarray] | None:
    """{finding name: bool mask} drawn in `image_path`, or None when the image has no sidecar."""
    path = sidecar_path(image_path)
    if not path.exists():
        return None
    try:
        with np.load(path) as npz:
            return {name: npz[name].astype(bool) for name in npz.files}
    except Exception as e:  # noqa: BLE001 - a cut or foreign file (BadZipFile, zlib.error, EOFError...): name it
        raise UserError(f"{path}: not a findings sidecar ({type(e).__name__}: {e})") from None


def image_shape(image_path: str | Path) -> tuple[int, int]:
    """(rows, columns) of the image file, from its header alone (DICOM Rows/Columns, else PIL's size): the
    resolution finding masks are given at. Photometric interpretation and bit depth do not change it."""
    path = Path(image_path)
    try:
        if _is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        from PIL import Image

        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: image file not found") from None
    except Exception as exc:  # noqa: BLE001 - any header the readers reject is the file's fault: name it
        raise UnreadableImage(f"{path}: cannot read the image size ({type(exc).__name__}: {exc})") from None


def sidecar_mask(image_path: str | Path) -> np.ndarray | None:
    """The union of the findings in the image's sidecar (all False when nothing was drawn), or None without one."""
    masks = read_sidecar(image_path)
    if masks is None:
        return None
    shape = image_shape(image_path)
    wrong = sorted(name for name, mask in masks.items() if mask.shape != shape)
    if wrong:
        raise UserError(f"{sidecar_path(image_path)}: the masks of {', '.join(wrong)} are not the image's "
                        f"{shape[0]}x{shape[1]} pixels (a sidecar of another image?)")
    return union(masks.values(), shape)


def union(masks: Iterable[np.ndarray], shape: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels on any of `masks` (all of one shape); `shape` gives the all-False mask when there is none."""
    out = None
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if out is not None and mask.shape != out.shape:
            raise UserError(f"finding masks of shapes {out.shape} and {mask.shape} cannot be joined")
        out = mask.copy() if out is None else out | mask
    if out is None:
        if shape is None:
            raise ValueError("union of no masks needs a shape")
        return np.zeros(shape, dtype=bool)
    return out


def box_mask(shape: tuple[int, int], boxes: Iterable[tuple[float, float, float, float]]) -> np.ndarray:
    """The pixels inside any (x, y, width, height) box (top-left origin, pixel units): columns floor(x) up to
    ceil(x + width), rows likewise, clipped to the image."""
    mask = np.zeros(shape, dtype=bool)
    for x, y, w, h in boxes:
        c0, c1 = max(0, int(np.floor(x))), min(shape[1], int(np.ceil(x + w)))
        r0, r1 = max(0, int(np.floor(y))), min(shape[0], int(np.ceil(y + h)))
        mask[r0:r1, c0:c1] = True
    return mask


def _overlaps(source: int, resized: int, pad: int, patch: int, side: int) -> np.ndarray:
    """[side, source]: how much of each source pixel row (or column) falls in each patch row (column), in
    source pixels, for one axis of the resize-and-pad."""
    step = source / resized  # source pixels per resized pixel
    starts = np.clip(np.arange(side) * patch - pad, 0, resized) * step
    ends = np.clip((np.arange(side) + 1) * patch - pad, 0, resized) * step
    edges = np.arange(source + 1, dtype=np.float64)
    return np.clip(np.minimum(ends[:, None], edges[None, 1:]) - np.maximum(starts[:, None], edges[None, :-1]), 0, None)


def patch_coverage(mask: np.ndarray, size: int, patch: int) -> np.ndarray:
    """[N] share of each patch's area on the mask, patches in row-major order (the ViT's token order), for an
    image of the mask's shape resized and padded to `size` x `size` and cut into `patch` x `patch` patches.
    Exact area: each patch's footprint is traced back to the image's pixels through the resize's geometry."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise UserError(f"a finding mask must be 2-D, got shape {mask.shape}")
    if size % patch:
        raise UserError(f"image size {size} is not a multiple of the patch size {patch}")
    h, w = mask.shape
    nh, nw, top, left = square_geometry(h, w, size)
    side = size // patch
    rows, cols = _overlaps(h, nh, top, patch, side), _overlaps(w, nw, left, patch, side)
    area = (patch * h / nh) * (patch * w / nw)  # a whole patch's footprint, in image pixels
    covered = rows @ mask.astype(np.float64) @ cols.T
    return np.clip(covered / area, 0.0, 1.0).ravel()


def input_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """[size, size] bool: the mask at the model's input geometry (`resize_and_pad`'s), a pixel on it when at
    least half its area is (exact area, as `patch_coverage` with one-pixel patches)."""
    return (patch_coverage(mask, size, 1) >= 0.5 - 1e-9).reshape(size, size)


def on_finding(mask: np.ndarray, size: int, patch: int, threshold: float = COVERAGE_THRESHOLD) -> np.ndarray:
    """[N] bool: the patches whose coverage by `mask` is at least `threshold`."""
    return patch_coverage(mask, size, patch) >= threshold - 1e-9  # a quarter computed as 0.2499999... counts


def ground_truth_grid(candidates: Iterable[int], mask_of: Callable[[int], np.ndarray | None], size: int,
                      patch: int, limit: int | None = None) -> tuple[list[int], np.ndarray]:
    """(the candidates kept, [kept, N] bool patches on a finding): walks `candidates` in order, keeps those
    `mask_of` gives a mask for (images without ground truth are passed over), and stops after `limit`."""
    kept: list[int] = []
    grids: list[np.ndarray] = []
    for i in candidates:
        if limit is not None and len(kept) >= limit:
            break
        mask = mask_of(i)
        if mask is not None:
            kept.append(i)
            grids.append(on_finding(mask, size, patch))
    side = size // patch
    return kept, np.stack(grids) if grids else np.zeros((0, side * side), dtype=bool)
