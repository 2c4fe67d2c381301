"""Masks as run-length codes, in SIIM-ACR Pneumothorax's format (`train-rle.csv`): read by the SIIM adapter,
written by the synthetic benchmark."""
from __future__ import annotations

from bench.core.lazy import lazy_module

np = lazy_module("numpy")

# "-1", or pairs of (offset from the end of the previous run, run length)
RLE_PATTERN = r"-1|\d+\s+\d+(?:\s+\d+\s+\d+)*"


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """SIIM's run-length code as a boolean (height, width) mask; `-1` (with or without spaces) is empty.

    Runs walk the image column by column (the transposed mask, flattened), and each start counts from the
    end of the previous run."""
    values = np.array(rle.split(), dtype=np.int64)
    mask = np.zeros(height * width, bool)
    if values.tolist() == [-1]:
        return mask.reshape(width, height).T
    if len(values) % 2 or (values < 0).any():
        raise ValueError(f"run-length code needs non-negative (start, length) pairs, got {rle.strip()[:40]!r}")
    gaps, lengths = values[0::2], values[1::2]
    starts = np.cumsum(gaps) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    if len(starts) and starts[-1] + lengths[-1] > mask.size:
        raise ValueError(f"run-length code runs past the end of a {height}x{width} mask")
    # mark run boundaries with +1/-1 and integrate, so no Python loop touches each run
    edges = np.zeros(mask.size + 1, np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + lengths, -1)
    mask = np.cumsum(edges[:-1]) > 0
    return mask.reshape(width, height).T


def rle_encode(mask: np.ndarray) -> str:
    """The inverse of `rle_decode`: `-1` for an empty mask, else relative (start, length) pairs."""
    flat = np.asarray(mask, bool).T.ravel()
    if not flat.any():
        return "-1"
    padded = np.concatenate(([False], flat, [False]))
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    gaps = starts - np.concatenate(([0], ends[:-1]))
    return " ".join(str(v) for pair in zip(gaps, ends - starts) for v in pair)
