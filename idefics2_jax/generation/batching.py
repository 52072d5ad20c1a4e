"""Bucketing of batch, prompt, image and new-token sizes, and grouping images by their valid size."""

from __future__ import annotations


import numpy as np

from ..nn.attention import patch_mask
from ..nn.model import real_image_mask

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
PATCH_STEP = 4  # image sides above 16 patches are padded to a multiple of this many patches


# --------------------------------------------------------------------------------------------------- bucketing
def bucket(n: int, minimum: int = 1) -> int:
    """Smallest value >= n on the ladder 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^(k-1)), at least `minimum`."""
    n = max(int(n), int(minimum))
    if n <= 2:
        return n
    p = 1 << (n - 1).bit_length()  # next power of two >= n
    return 3 * p // 4 if 3 * p // 4 >= n else p


def patch_bucket(pixels: int, patch: int, grid: int) -> int:
    """Padded (or cropped) image side in pixels for a side of `pixels`.

    Only whole patches count (the patch conv is a valid conv; a patch is valid iff all its pixels are), so the side
    is first cut to floor(pixels / patch) patches: the cut pixels never reach the model in the reference either.
    That count is rounded up on the ladder 1, 2, 3, 4, 6, 8, 12, 16, then in steps of PATCH_STEP patches (vision
    attention is quadratic in patches: a 512-px side is 36 patches, which the coarse ladder would pad to 48, 1.8x
    the patches and 3.2x the attention), never past the model's position grid when the image fits in it.
    """
    n = max(1, int(pixels) // patch)
    b = bucket(n) if n <= 16 else -(-n // PATCH_STEP) * PATCH_STEP
    if n <= grid < b:
        b = grid
    return b * patch


def image_groups(pixel_values, pixel_attention_mask, patch: int, grid: int, *, rows: int, slots: int,
                 buckets: bool = True):
    """Host-side: the real images of pixel_values [B, N, C, H, W], each cut to its own valid patches and grouped by
    padded size, so the vision tower never runs on another image's padding or on padding slots.

    The processor pads every image to the largest in the batch (with splitting: four half-size crops padded to the
    size of the whole image, 2.5x the patches and 4x the attention of the crops themselves); the reference runs the
    tower on all of it. The answer does not depend on it: padded patches are masked keys, and position ids count
    valid patches from the top-left corner, so cutting the invalid right / bottom margin changes nothing.

    Returns (groups, image_mask): groups is a tuple of {"pixel_values" [G, C, h, w], "pixel_attention_mask"
    [G, h, w], "index" [G]} (index = row * slots + slot; G bucketed, its extra entries blank with index
    rows * slots, dropped when scattered), image_mask [rows, slots] marks the real images (all-zero pixels are
    padding, the reference's rule).
    """
    pv = np.asarray(pixel_values)
    b, n, c, h, w = pv.shape
    pam = (np.ones((b, n, h, w), bool) if pixel_attention_mask is None
           else np.asarray(pixel_attention_mask).astype(bool))
    real = real_image_mask(pv)
    valid = patch_mask(pam, patch)
    members: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, j in zip(*np.nonzero(real)):
        rows_used = np.flatnonzero(valid[i, j].any(axis=1))
        cols_used = np.flatnonzero(valid[i, j].any(axis=0))
        eh = rows_used[-1] + 1 if rows_used.size else 1
        ew = cols_used[-1] + 1 if cols_used.size else 1
        side = ((patch_bucket(eh * patch, patch, grid), patch_bucket(ew * patch, patch, grid)) if buckets
                else (eh * patch, ew * patch))
        members.setdefault(side, []).append((int(i), int(j)))
    groups = []
    for (sh, sw), items in sorted(members.items()):
        g = bucket(len(items)) if buckets else len(items)
        gv = np.zeros((g, c, sh, sw), np.float32)
        gm = np.zeros((g, sh, sw), bool)
        index = np.full((g,), rows * slots, np.int32)
        ch, cw = min(h, sh), min(w, sw)
        for k, (i, j) in enumerate(items):
            gv[k, :, :ch, :cw] = pv[i, j, :, :ch, :cw]
            gm[k, :ch, :cw] = pam[i, j, :ch, :cw]
            index[k] = i * slots + j
        groups.append({"pixel_values": gv, "pixel_attention_mask": gm, "index": index})
    image_mask = np.zeros((rows, slots), bool)
    image_mask[:b, :n] = real
    return tuple(groups), image_mask
