"""Images to model inputs, like the Llama 4 processor: tiles, a thumbnail, and the prompt.

    image [3, H, W] -> choose a canvas of rows x cols tiles (rows * cols <= max_tiles)
      -> resize without distortion (upscale at most to one tile side) -> pad right/bottom with 0
      -> rescale to [0, 1], normalise (x - 0.5) / 0.5 -> split into tiles, row-major
      -> if more than one tile, add a global thumbnail: the whole image resized to one tile
    prompt: each <|image|> placeholder becomes
      <|image_start|> [for each tile row: tiles' <|patch|> runs joined by <|tile_x_separator|>,
      then <|tile_y_separator|>] <|image|> <|patch|> x tokens_per_tile <|image_end|>
      (a one-tile image has no tile rows: just <|image|> and its patches)

Canvas choice (Hugging Face `get_best_fit`): for each canvas the no-distortion scale is
min(canvas_h / h, canvas_w / w); take the smallest scale >= 1 if any canvas upscales, else the
largest (least shrinking) scale; among canvases with that scale, the smallest area.

Resizing is bilinear with antialiasing in torch (`F.interpolate`); Pillow is needed only to
open image files. Like Hugging Face, rescaling and normalising happen in bfloat16 by default
("as in the original implementation"); pass dtype=torch.float32 to skip that rounding.
Simplification: torchvision's uint8 resize kernel rounds differently by at most one grey level.

Axes: c channels, y x pixel rows / columns, ty tx tile rows / columns, n tiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .config import VisionConfig


def candidate_canvases(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) tile grid with rows * cols <= max_tiles, in Hugging Face's order."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [grid for grids in by_ratio.values() for grid in grids]


def choose_tiles(height: int, width: int, tile: int, max_tiles: int = 16) -> tuple[int, int]:
    """The (rows, cols) tile grid for an image of height x width pixels."""
    grids = candidate_canvases(max_tiles)
    scales = [min(r * tile / height, c * tile / width) for r, c in grids]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    tied = [g for g, s in zip(grids, scales) if s == best]
    return min(tied, key=lambda g: g[0] * g[1])  # first smallest area, like argmin


def resized_size(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Size after resizing without distortion toward the canvas, upscaling at most to one tile."""
    target_h = min(max(height, tile), canvas_h)
    target_w = min(max(width, tile), canvas_w)
    if target_w / width < target_h / height:
        return max(min(int(height * target_w / width), target_h), 1), target_w
    return target_h, max(min(int(width * target_h / height), target_w), 1)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return out.round().clamp(0, 255) if not image.is_floating_point() else out


def _normalise(pixels: torch.Tensor, dtype) -> torch.Tensor:
    # x / 255, then (x - mean) / std with mean = std = 0.5
    return (pixels.to(dtype) * (1 / 255) - 0.5) / 0.5


def to_tensor(image) -> torch.Tensor:
    """A PIL image, a numpy array [y, x, c] or a tensor [c, y, x] -> uint8-valued tensor [c, y, x]."""
    if isinstance(image, torch.Tensor):
        return image
    if hasattr(image, "convert"):  # PIL
        import numpy as np

        image = np.asarray(image.convert("RGB"))
    return rearrange(torch.as_tensor(image), "y x c -> c y x")


def preprocess(image, cfg: VisionConfig, max_tiles: int = 16, dtype=torch.bfloat16):
    """One image -> (pixel_values [n, c, S, S], (rows, cols)). Pixel values 0..255."""
    image = to_tensor(image)
    if image.dim() != 3 or image.shape[0] != cfg.num_channels:
        raise ValueError(f"image must be [{cfg.num_channels}, height, width] (channels first), "
                         f"got shape {tuple(image.shape)}")
    _, h, w = image.shape
    tile = cfg.image_size
    rows, cols = choose_tiles(h, w, tile, max_tiles)
    new_h, new_w = resized_size(h, w, rows * tile, cols * tile, tile)
    canvas = F.pad(_resize(image, (new_h, new_w)), (0, cols * tile - new_w, 0, rows * tile - new_h), value=0)
    tiles = rearrange(_normalise(canvas, dtype), "c (ty y) (tx x) -> (ty tx) c y x", ty=rows, tx=cols)
    if rows * cols > 1:  # global thumbnail after the tiles
        thumb = _normalise(_resize(image, (tile, tile)), dtype)
        tiles = torch.cat([tiles, thumb[None]])
    return tiles, (rows, cols)


def image_prompt(grid: tuple[int, int], tokens_per_tile: int) -> str:
    """The token string that stands for one image in the prompt (see module docstring)."""
    rows, cols = grid
    patches = "<|patch|>" * tokens_per_tile
    s = "<|image_start|>"
    if rows * cols > 1:
        for _ in range(rows):
            s += "<|tile_x_separator|>".join([patches] * cols) + "<|tile_y_separator|>"
    return s + "<|image|>" + patches + "<|image_end|>"


def prepare(text: str, images: list, cfg: VisionConfig, max_tiles: int = 16, dtype=torch.bfloat16):
    """Expand each <|image|> placeholder of `text` for the matching image, in order.
    Returns (expanded text, pixel_values for all images concatenated in prompt order)."""
    parts = text.split("<|image|>")
    if len(parts) - 1 != len(images):
        raise ValueError(f"the text has {len(parts) - 1} <|image|> placeholders but {len(images)} images were given")
    out, pixels = parts[0], []
    for image, rest in zip(images, parts[1:]):
        tiles, grid = preprocess(image, cfg, max_tiles, dtype)
        pixels.append(tiles)
        out += image_prompt(grid, cfg.tokens_per_tile) + rest
    return out, (torch.cat(pixels) if pixels else None)
