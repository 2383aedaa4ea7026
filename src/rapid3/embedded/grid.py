"""Image grids with captions: columns of 32x32 images (upscaled, nearest) over their captions."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scenes import IMAGE_SIZE


def caption_grid(rows: list[list[np.ndarray]], captions: list[str], title: str, *, scale: int = 4) -> Image.Image:
    """``rows[r][c]`` is the uint8 (H, W, 3) image of row r, column c; ``captions[c]`` goes under column c."""
    cell, pad, head_h = IMAGE_SIZE * scale, 4, 16
    wrapped = ["\n".join(textwrap.wrap(caption, width=max(cell // 6, 8))) for caption in captions]
    text_h = 12 * max(text.count("\n") + 1 for text in wrapped) + 4
    grid = Image.new("RGB", (len(captions) * (cell + pad) + pad, head_h + len(rows) * (cell + pad) + text_h), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.text((pad, 2), title, fill="black", font=font)
    for col, text in enumerate(wrapped):
        x = pad + col * (cell + pad)
        for row, images in enumerate(rows):
            grid.paste(Image.fromarray(images[col]).resize((cell, cell), Image.NEAREST), (x, head_h + row * (cell + pad)))
        draw.multiline_text((x, head_h + len(rows) * (cell + pad)), text, fill="black", font=font, spacing=1)
    return grid
