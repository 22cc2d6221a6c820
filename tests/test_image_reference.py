"""minillama4.image against transformers' Llama 4 image processor and prompt expansion, from a
saved fixture: transformers' processor needs torchvision, which does not install beside this
project's CPU torch, so scripts/make_image_reference.py ran it (torch 2.14.1, torchvision 0.29.1,
transformers 5.24.0) and saved inputs and outputs in tests/data/image_reference.safetensors. This
test reads that file (safetensors, no pickle) and runs only our code.

Checked per case and max_patches (4 and 16), at 28 px tiles of 7 px patches (4 tokens per tile):
the tile grid (transformers' aspect_ratios), the number and shape of tiles (with the global
thumbnail), and the bfloat16 pixel values; then the tile grid and resized size of every image from
1 x 1 to 99 x 99 px, and the prompt that Llama4Processor expanded for two images.

Measured: every pixel value is bit-identical on x86-64 (torch 2.13 here, AVX2 and AVX-512 kernels).
With torch's unvectorised kernels (ATEN_CPU_CAPABILITY=default) one value of 11,760 in the int64
case differs by one grey level (a float32 resize result at x.5 rounds the other way). PIXEL_TOL
allows that and no more: one grey level is 2/255 = 0.0078 in normalised units, which bfloat16
(ulp 2**-7 near 1) can show as up to 1.5 ulps = 0.0117, in at most 0.1% of the values. Before the
fixes this fixture prompted, our code was off by up to 1.5 ulps in up to 17% of the values (a float
resize of uint8 images instead of torch's uint8 kernel) and by a whole image on 83 x 83 and
23 x 184 px (resized one pixel larger than transformers does).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from minillama4 import image as img
from minillama4.config import VisionConfig

FIXTURE = Path(__file__).resolve().parent / "data" / "image_reference.safetensors"
with safe_open(FIXTURE, framework="pt") as _f:
    META = _f.metadata()
    REF = {k: _f.get_tensor(k) for k in _f.keys()}
CASES = json.loads(META["cases"])
MAX_PATCHES = json.loads(META["max_patches"])
CFG = VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                   image_size=int(META["tile"]), patch_size=int(META["patch"]), projector_input_dim=16,
                   projector_output_dim=16, vision_output_dim=16)
PIXEL_TOL = 1.5 * 2**-7  # one grey level (2/255) after bfloat16 rounding; see the module docstring
PIXEL_TOL_FRACTION = 1e-3  # of the values, that may differ at all


def load_input(case):
    """The case's input as the script gave it to transformers: a tensor [3, y, x], a numpy array
    [y, x, c], or a PIL image (Pillow is in the dev extra; minillama4 itself needs it only for files)."""
    x = REF[f"in.{case['name']}"]
    if case["kind"] == "tensor":
        return x
    if case["kind"] == "pil":
        from PIL import Image

        return Image.fromarray(x.numpy())  # RGB or RGBA by its last axis
    return x.numpy()


def test_fixture_records_its_versions():
    """The fixture says what made it, so a mismatch after regenerating can be traced to a version."""
    assert META["transformers"] == "5.24.0" and META["torchvision"].startswith("0.29.1")
    assert META["torch"].startswith("2.14.1") and CFG.tokens_per_tile == 4


@pytest.mark.parametrize("mp", MAX_PATCHES)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_tiles_match_transformers(case, mp):
    """Same tile grid, same tiles (canvas tiles row-major, then the thumbnail if there is more than
    one tile), pixel values within PIXEL_TOL. The cases cover upscaling (1 x 1, 5 x 7, 20 x 14 px),
    an exact tile (no resize at all), exact multiples, shrinking, odd sizes, the two sizes where
    transformers' float32 scale floors one pixel short, and float32 / float64 / int64 / PIL input."""
    ref = REF[f"out.{case['name']}.mp{mp}.pixel_values"]
    grid = tuple(REF[f"out.{case['name']}.mp{mp}.aspect_ratios"].tolist())
    tiles, ours_grid = img.preprocess(load_input(case), CFG, max_tiles=mp)
    assert ours_grid == grid
    assert tiles.shape == ref.shape and tiles.dtype == ref.dtype == torch.bfloat16
    diff = (tiles.float() - ref.float()).abs()
    n_diff = int((diff > 0).sum())
    assert diff.max() <= PIXEL_TOL and n_diff <= PIXEL_TOL_FRACTION * diff.numel(), \
        f"max |diff| {float(diff.max()):.4f}, {n_diff} of {diff.numel()} values differ"


@pytest.mark.parametrize("mp", MAX_PATCHES)
def test_grid_and_resized_size_match_transformers_for_every_small_image(mp):
    """For every image from 1 x 1 to 99 x 99 px: the tile grid, and the size the image is resized
    to before padding (what transformers' resize was asked for). A size one pixel off moves every
    pixel, so this is checked exactly, not through pixel values."""
    table = REF[f"geometry.mp{mp}"]
    tile = CFG.image_size
    bad = []
    for h in range(1, table.shape[0] + 1):
        for w in range(1, table.shape[1] + 1):
            rows, cols = img.choose_tiles(h, w, tile, mp)
            ours = (rows, cols, *img.resized_size(h, w, rows * tile, cols * tile, tile))
            if ours != tuple(table[h - 1, w - 1].tolist()):
                bad.append(((h, w), ours, tuple(table[h - 1, w - 1].tolist())))
    assert not bad, f"{len(bad)} sizes differ, e.g. (h, w), ours, transformers': {bad[:5]}"


@pytest.mark.parametrize("mp", MAX_PATCHES)
def test_prompt_expansion_matches_llama4_processor(mp):
    """prepare() expands the same text to exactly the string Llama4Processor built (a one-tile image:
    <|image|> and its patches only; a many-tile one: rows of tiles, separators, then the thumbnail),
    and returns both images' tiles in prompt order."""
    names = json.loads(META["prompt_images"])
    by_name = {c["name"]: c for c in CASES}
    text, pixels = img.prepare(META["prompt"], [load_input(by_name[n]) for n in names], CFG, max_tiles=mp)
    assert text == json.loads(META["prompts"])[str(mp)]
    ref = torch.cat([REF[f"out.{n}.mp{mp}.pixel_values"] for n in names])
    assert pixels.shape == ref.shape and float((pixels.float() - ref.float()).abs().max()) <= PIXEL_TOL


def test_resized_size_keeps_transformers_float32_floor():
    """The two geometry cases by hand: transformers resizes 83 x 83 px to 56 x 55 on a 2 x 2 canvas
    of 28 px tiles, and 23 x 184 px to 13 x 112 on a 1 x 4 canvas (float32 scale, then floor), where
    exact arithmetic gives 56 x 56 and 14 x 112."""
    assert img.resized_size(83, 83, 56, 56, 28) == (56, 55)
    assert img.resized_size(23, 184, 28, 112, 28) == (13, 112)
    assert img.resized_size(100, 200, 336, 336, 336) == (168, 336)  # float64 where the canvas does not limit


def test_uint8_and_float_inputs_of_the_same_image_agree_within_one_grey_level():
    """The uint8 path uses torch's uint8 resize kernel (as torchvision does) and the float path the
    float kernel; on the same picture they may differ only by that kernel's rounding."""
    x = REF["in.odd_37x61"]  # numpy layout [y, x, c]
    a, _ = img.preprocess(np.ascontiguousarray(x.numpy()), CFG, max_tiles=4)
    b, _ = img.preprocess(x.numpy().astype(np.float32), CFG, max_tiles=4)
    assert float((a.float() - b.float()).abs().max()) <= PIXEL_TOL
