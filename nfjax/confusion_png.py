"""A confusion matrix drawn as a PNG with Pillow (no plotting library needed).

Rows are the true classes, columns the predicted ones; each cell's colour is its share of the row (white 0 to dark
blue 1, so the diagonal reads as per-class recall), and with up to ``MAX_CELL_TEXT_CLASSES`` classes each cell
shows its count. Class names label the rows (left) and the columns (top, rotated) up to ``MAX_LABELED_CLASSES``.
"""

from __future__ import annotations

import numpy as np

MAX_CELL_TEXT_CLASSES = 30  # cells show their count up to this many classes
MAX_LABELED_CLASSES = 100  # rows and columns carry class names up to this many classes
GRID_PIXELS = 900  # the matrix's side, about (cells are 3 to 56 pixels)
LOW, HIGH = np.array([255, 255, 255]), np.array([8, 48, 107])  # white -> dark blue


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def draw_confusion(
    matrix: np.ndarray | list, class_names: list[str] | tuple[str, ...], path: str, title: str = ""
) -> dict[str, dict[str, tuple[int, int, int, int]]]:
    """Writes ``matrix`` (int [K, K], rows true, columns predicted) as a PNG at ``path``. Returns where the
    labels went: ``{"rows": {name: box}, "columns": {name: box}}`` with boxes (x0, y0, x1, y1) in pixels
    (empty when K > MAX_LABELED_CLASSES)."""
    from PIL import Image, ImageDraw

    counts = np.asarray(matrix, np.int64)
    k = counts.shape[0]
    cell = int(np.clip(GRID_PIXELS // max(k, 1), 3, 56))
    labeled = k <= MAX_LABELED_CLASSES
    font = _font(max(9, min(16, cell - 2)) if labeled else 12)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = [str(n) for n in class_names] if labeled else []
    label = max([_text_size(scratch, n, font)[0] for n in names] + [0]) + 8
    heading = _text_size(scratch, "Ag", font)[1] + 12
    x0, y0 = label + heading, label + 2 * heading + (heading if title else 0)
    image = Image.new("RGB", (x0 + k * cell + 10, y0 + k * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((8, 6), title, fill="black", font=font)
    draw.text((x0, y0 - label - heading), "predicted class", fill="black", font=font)
    _draw_vertical(image, "true class", (4, y0), font)
    _draw_cells(draw, counts, (x0, y0), cell, font if k <= MAX_CELL_TEXT_CLASSES else None)
    boxes: dict[str, dict] = {"rows": {}, "columns": {}}
    for i, name in enumerate(names):
        width, height = _text_size(draw, name, font)
        top = y0 + i * cell + (cell - height) // 2
        draw.text((x0 - 4 - width, top), name, fill="black", font=font, anchor="lt")
        boxes["rows"][name] = (x0 - 4 - width, top, x0 - 4, top + height)
        left = x0 + i * cell + (cell - height) // 2
        boxes["columns"][name] = _draw_vertical(image, name, (left, y0 - 4 - width), font)
    image.save(path, format="PNG")
    return boxes


def _draw_cells(draw, counts: np.ndarray, origin: tuple[int, int], cell: int, font) -> None:
    """Cells coloured by their share of the row, with the count when ``font`` is given."""
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    colours = (LOW + share[..., None] * (HIGH - LOW)).round().astype(int)
    for i, j in np.ndindex(counts.shape):
        x, y = origin[0] + j * cell, origin[1] + i * cell
        outline = (220, 220, 220) if cell >= 8 else None  # small cells: colour only
        draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=tuple(colours[i, j]), outline=outline)
        if font is not None and counts[i, j]:
            text = str(counts[i, j])
            width, height = _text_size(draw, text, font)
            if width <= cell - 2:
                fill = "white" if share[i, j] > 0.5 else "black"
                draw.text((x + (cell - width) // 2, y + (cell - height) // 2), text, fill=fill, font=font, anchor="lt")


def _draw_vertical(image, text: str, origin: tuple[int, int], font) -> tuple[int, int, int, int]:
    """``text`` rotated 90 degrees (reading upwards) with its top-left corner at ``origin``; returns its box."""
    from PIL import Image, ImageDraw

    width, height = _text_size(ImageDraw.Draw(image), text, font)
    strip = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(strip).text((0, 0), text, fill="black", font=font, anchor="lt")
    rotated = strip.rotate(90, expand=True)
    image.paste(rotated, origin)
    return origin[0], origin[1], origin[0] + height, origin[1] + width
