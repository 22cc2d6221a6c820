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

Resizing is bilinear with antialiasing in torch (`F.interpolate`), called the way torchvision's
resize calls it (uint8 images with torch's uint8 kernel), and the resized size is floored from the
same float32 / float64 scales as Hugging Face's; Pillow is needed only to open image files. Like
Hugging Face, rescaling and normalising happen in bfloat16 by default ("as in the original
implementation"); pass dtype=torch.float32 to skip that rounding. Against transformers 5.24 /
torchvision 0.29.1 the tiles, thumbnail and prompt are bit-identical on 18 test images, and the tile
grid and resized size agree for every image up to 99 x 99 px (tests/test_image_reference.py; with
torch's unvectorised CPU kernels one value in 11,760 of a float-resized case is one grey level off).

Input contract: a PIL image (converted to RGB), a numpy array [y, x, 3] or a tensor [3, y, x], of
any integer or float dtype, with values 0..255 (like the processor's default do_rescale=True).
Values outside 0..255 are refused. A float image with values in 0..1 is most likely already
rescaled: like Hugging Face, it is processed as given (so it comes out nearly black), with a
warning saying to multiply it by 255. Grayscale arrays [y, x] are refused (a PIL image converts).

Axes: c channels, y x pixel rows / columns, ty tx tile rows / columns, n tiles.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange

from .config import VisionConfig


# Llama 4 uses 16 tiles (its processor's max_patches). The canvas search below is quadratic in
# max_tiles (20,000 took seconds, 10**6 hung), and each tile is tokens_per_tile (144) prompt tokens,
# so 256 tiles (36,864 tokens per image) is a generous ceiling that still answers at once.
MAX_TILES = 256


def candidate_canvases(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) tile grid with rows * cols <= max_tiles, in Hugging Face's order."""
    _check_max_tiles(max_tiles)
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [grid for grids in by_ratio.values() for grid in grids]


def choose_tiles(height: int, width: int, tile: int, max_tiles: int = 16) -> tuple[int, int]:
    """The (rows, cols) tile grid for an image of height x width pixels."""
    _check_max_tiles(max_tiles)
    if height < 1 or width < 1:
        raise ValueError(f"an image of {height} x {width} pixels has no pixels to tile")
    grids = candidate_canvases(max_tiles)
    scales = [min(r * tile / height, c * tile / width) for r, c in grids]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    tied = [g for g, s in zip(grids, scales) if s == best]
    return min(tied, key=lambda g: g[0] * g[1])  # first smallest area, like argmin


def resized_size(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Size after resizing without distortion toward the canvas, upscaling at most to one tile:
    the limiting side becomes its target, the other floor(side * scale)."""
    target_h = min(max(height, tile), canvas_h)
    target_w = min(max(width, tile), canvas_w)
    # Hugging Face computes a side's scale in float32 when the canvas limits that side (the canvas
    # side is a torch int64 scalar there), else in float64, and floors side * scale, which can land
    # one pixel short: 83 x 83 px onto a 56 x 56 canvas becomes 56 x 55. Kept for identical inputs.
    scale_h = torch.tensor(target_h) / height if canvas_h < max(height, tile) else target_h / height
    scale_w = torch.tensor(target_w) / width if canvas_w < max(width, tile) else target_w / width
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), target_h), 1), target_w
    return target_h, max(min(math.floor(width * scale_h), target_w), 1)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear with antialiasing, as torchvision's resize does it, in the image's dtype: uint8 on the
    CPU with torch's own uint8 kernel, float32 and float64 as they are, anything else in float32 and
    back (integers rounded). The same size is returned untouched."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    native = (torch.float32, torch.float64) + ((torch.uint8,) if image.device.type == "cpu" else ())
    x = image[None] if image.dtype in native else image[None].float()
    out = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if out.dtype == image.dtype:
        return out
    return (out if image.is_floating_point() else out.round()).to(image.dtype)


def _normalise(pixels: torch.Tensor, dtype) -> torch.Tensor:
    # x / 255, then (x - mean) / std with mean = std = 0.5
    return (pixels.to(dtype) * (1 / 255) - 0.5) / 0.5


def to_tensor(image) -> torch.Tensor:
    """A PIL image, a numpy array [y, x, c] or a tensor [c, y, x] -> tensor [c, y, x], values as given."""
    if isinstance(image, torch.Tensor):
        return image
    if image is None or isinstance(image, (str, bytes, os.PathLike)):
        hint = "; open the file first, e.g. with PIL.Image.open(path)" if image is not None else ""
        raise TypeError(f"image must be a PIL image, a numpy array [height, width, 3] or a tensor "
                        f"[3, height, width], got {image!r}{hint}")
    import numpy as np

    if hasattr(image, "convert"):  # PIL: transparency is composited onto white, like Hugging Face
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            from PIL import Image

            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = np.array(image.convert("RGB"))  # a copy: np.asarray of a PIL image is read-only
    array = np.asarray(image)
    if array.dtype.kind not in "uif":  # bool, object, complex, strings
        raise TypeError(f"image must hold integer or float pixel values 0..255, got a {type(image).__name__} "
                        f"of dtype {array.dtype}")
    if array.ndim != 3:
        gray = "; for a grayscale image pass np.stack([image] * 3, axis=-1) or a PIL image" if array.ndim == 2 else ""
        raise ValueError(f"a numpy image must be [height, width, channels] (channels last), "
                         f"got shape {array.shape}{gray}")
    return rearrange(torch.as_tensor(array), "y x c -> c y x")


def _check_max_tiles(max_tiles) -> None:
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or not 1 <= max_tiles <= MAX_TILES:
        raise ValueError(f"max_tiles={max_tiles!r}: expected a positive int <= {MAX_TILES} (Llama 4 uses 16)")


def _check_config(cfg, dtype) -> None:
    if not isinstance(cfg, VisionConfig):
        hint = " (pass its .vision)" if hasattr(cfg, "vision") else ""
        raise TypeError(f"cfg must be the model's VisionConfig, e.g. model.config.vision; got "
                        f"{type(cfg).__name__}{hint}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype!r}: expected a float dtype such as torch.bfloat16 or torch.float32")


def _checked_image(image, cfg: VisionConfig, name: str = "image") -> torch.Tensor:
    """to_tensor, then refuse what preprocess cannot read as an image [c, y, x] with values 0..255."""
    pixels = to_tensor(image)
    c = cfg.num_channels
    if pixels.dim() != 3 or pixels.shape[0] != c:
        if isinstance(image, torch.Tensor):
            raise ValueError(f"{name} must be [{c}, height, width] (channels first), got shape {tuple(pixels.shape)}")
        raise ValueError(f"{name} must be an array [height, width, {c}] (channels last), got shape "
                         f"{(*pixels.shape[1:], pixels.shape[0])}")
    if pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise ValueError(f"{name} has no pixels: shape {tuple(pixels.shape)}")
    if pixels.dtype == torch.bool or pixels.is_complex():
        raise TypeError(f"{name} has dtype {pixels.dtype}: expected integer or float pixel values 0..255")
    if pixels.dtype != torch.uint8:
        lo, hi = (float(v) for v in torch.aminmax(pixels))
        if not 0 <= lo <= hi <= 255:  # (NaN fails too)
            raise ValueError(f"{name} has pixel values from {lo:g} to {hi:g} ({pixels.dtype}): expected 0..255")
        if pixels.is_floating_point() and 0 < hi <= 1:
            warnings.warn(f"{name} is {pixels.dtype} with values 0..{hi:g}: pixel values are read as 0..255 (like "
                          "the Llama 4 processor), so it comes out almost black; if it is a 0..1 image, pass "
                          "image * 255", UserWarning, stacklevel=3)
    return pixels


def preprocess(image, cfg: VisionConfig, max_tiles: int = 16, dtype=torch.bfloat16):
    """One image -> (pixel_values [n, c, S, S], (rows, cols)). Pixel values 0..255."""
    _check_config(cfg, dtype)
    _check_max_tiles(max_tiles)
    return _tiles(_checked_image(image, cfg), cfg, max_tiles, dtype)


def _tiles(image: torch.Tensor, cfg: VisionConfig, max_tiles: int, dtype):
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
    Returns (expanded text, pixel_values for all images concatenated in prompt order).
    Every argument and image is checked before the first image is processed."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str with <|image|> placeholders, got {type(text).__name__}")
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of images, one per <|image|> placeholder, got a "
                        f"{type(images).__name__}: pass a list of images, e.g. [image]")
    _check_config(cfg, dtype)
    _check_max_tiles(max_tiles)
    parts = text.split("<|image|>")
    if len(parts) - 1 != len(images):
        raise ValueError(f"the text has {len(parts) - 1} <|image|> placeholders but {len(images)} images were given")
    images = [_checked_image(image, cfg, f"images[{i}]") for i, image in enumerate(images)]
    out, pixels = parts[0], []
    for image, rest in zip(images, parts[1:]):
        tiles, grid = _tiles(image, cfg, max_tiles, dtype)
        pixels.append(tiles)
        out += image_prompt(grid, cfg.tokens_per_tile) + rest
    return out, (torch.cat(pixels) if pixels else None)
