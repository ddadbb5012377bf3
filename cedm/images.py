"""Image grids: the one writer behind the sample stage's grid.png, the evaluation's confidence
grids and the report's side-by-side grids (training images of a cluster | images generated for it).

A grid is rows of blocks: each row an optional text label on its left and one or more blocks of
images (e.g. [exemplars, samples]), blocks separated by a wider gap, an optional header over
each block. Small images are enlarged by an integer factor (nearest neighbour) so that a 8x8
digit stays a crisp, viewable square.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

PAD = 2          # pixels between images (at the enlarged scale: PAD * scale)
GAP = 12         # pixels between blocks, after scaling
MIN_CELL = 48    # images smaller than this are enlarged by an integer factor


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:          # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def grid(rows: list[list[np.ndarray]], labels: list[str] | None = None, headers: list[str] | None = None,
         cols: int | None = None, min_cell: int = MIN_CELL, label_header: str | None = None):
    """A PIL image of `rows`, each a list of blocks (uint8 [k,H,W,3] arrays, k may be 0).

    Block j of every row gets max(k) columns (or `cols`), so the blocks line up; `labels` (one per
    row) are drawn left of the rows, `headers` (one per block) above the first row, `label_header`
    above the labels."""
    from PIL import Image, ImageDraw

    shapes = [b.shape[1:3] for r in rows for b in r if len(b)]
    if not shapes:
        raise ValueError("an image grid needs at least one image")
    h, w = shapes[0]
    scale = max(1, -(-min_cell // max(h, w)))
    ch, cw, pad = h * scale, w * scale, PAD
    nblocks = max(len(r) for r in rows)
    widths = [cols or max((len(r[j]) if j < len(r) else 0) for r in rows) for j in range(nblocks)]
    font, small = _font(15), _font(12)
    text_w = 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        text_w = max(int(probe.textlength(t, font=font)) for t in labels) + 14
        if label_header:
            text_w = max(text_w, int(probe.textlength(label_header, font=small)) + 14)
    head_h = 20 if headers or label_header else 0
    block_w = [n * (cw + pad) for n in widths]
    width = text_w + sum(block_w) + GAP * (nblocks - 1) + pad
    height = head_h + len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x0s = [text_w + sum(block_w[:j]) + GAP * j for j in range(nblocks)]
    for j, text in enumerate(headers or []):
        draw.text((x0s[j] + pad, 3), text, fill=(60, 60, 60), font=small)
    if labels and label_header:
        draw.text((4, 3), label_header, fill=(60, 60, 60), font=small)
    for r, row in enumerate(rows):
        y = head_h + pad + r * (ch + pad)
        if labels:
            draw.text((4, y + max(0, (ch - 15) // 2)), labels[r], fill=(30, 30, 30), font=font)
        for j, block in enumerate(row):
            for i, img in enumerate(np.asarray(block)[:widths[j]]):
                tile = Image.fromarray(np.ascontiguousarray(img))
                if scale > 1:
                    tile = tile.resize((cw, ch), Image.NEAREST)
                canvas.paste(tile, (x0s[j] + pad + i * (cw + pad), y))
    return canvas


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(path, image) -> None:
    """Write a PIL image as PNG, atomically."""
    from cedm.io import write_bytes

    write_bytes(Path(path), png_bytes(image))


def rows_by_label(images: np.ndarray, labels: np.ndarray, per_row: int, max_rows: int) -> tuple[list, list]:
    """(ids, [[images of id]]): one row per label value (sorted), its first `per_row` images."""
    ids = np.unique(labels)[:max_rows]
    return list(ids), [[images[labels == c][:per_row]] for c in ids]
