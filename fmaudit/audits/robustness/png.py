"""Example images of `robustness.image_attack` as PNG files, with the standard library only (zlib + struct),
so writing them needs no imaging library."""

from __future__ import annotations

import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np


def safe_name(s: str) -> str:
    """`s` reduced to a short file-name-safe string (an example id in a PNG's name)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:60]


def example_strip(clean: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """(C, H, W) clean and adversarial images -> one uint8 (H', W', C) strip: clean | adversarial |
    perturbation amplified to full range (gray = no change)."""
    c, h, w = clean.shape
    delta = adv.astype(np.float64) - clean.astype(np.float64)
    m = float(np.abs(delta).max())
    pert = 0.5 + 0.5 * delta / m if m > 0 else np.full_like(delta, 0.5)
    scale = max(1, min(8, math.ceil(96 / max(h, w))))
    gap = np.full((c, h * scale, 2 * scale), 1.0)

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(np.clip(a, 0, 1), scale, axis=1), scale, axis=2)

    img = np.concatenate([up(clean), gap, up(adv), gap, up(pert)], axis=2)
    img = np.round(img * 255).astype(np.uint8).transpose(1, 2, 0)
    if c not in (1, 3):
        img = img[:, :, :1]
    return img


def write_png(path: Path, img: np.ndarray) -> None:
    """Write a uint8 (H, W, 1) gray or (H, W, 3) RGB image as an 8-bit PNG."""
    h, w, c = img.shape
    color = {1: 0, 3: 2}[c]
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    path.write_bytes(png)
