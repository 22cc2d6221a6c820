"""Make tests/data/image_reference.safetensors: transformers' Llama 4 image processor and prompt
expansion on a seeded set of images, for tests/test_image_reference.py.

transformers' Llama4ImageProcessor (called Llama4ImageProcessorFast before transformers 5.2x; the
old name is a deprecated alias) needs torchvision, which does not install beside the project's CPU
torch, so this script runs in a separate environment and the test only reads what it saved.

For each case (uint8 tensors and arrays of many shapes, a float32 tensor, a float64 array, an
int64 array, an RGB and an RGBA PIL image) and each max_patches in MAX_PATCHES, it saves
  in.<case>                      the input, as given to both processors (uint8 / float / int; a PIL
                                 case holds the PIL image's array, RGB or RGBA)
  out.<case>.mp<N>.pixel_values  Llama4ImageProcessor's pixel_values [tiles (+ thumbnail), 3, 28, 28]
                                 in bfloat16, as it returns them
  out.<case>.mp<N>.aspect_ratios its aspect_ratios [rows, cols]
  geometry.mp<N>                 for every image from 1 x 1 to 99 x 99 px: the tile grid and the size
                                 the processor resizes it to before padding [99, 99, 4] int16
and in the safetensors metadata (strings only) a JSON list of cases, the expanded prompts that
Llama4Processor.__call__ made from PROMPT (two images: a one-tile and a many-tile one) and the
versions. The tile is 28 px with 7 px patches (4 x 4 patches, pixel shuffle 0.5: 4 tokens per tile),
so the fixture stays small (about 1.2 MB) while the tile rules are the same as at 336 px.

Made with torch 2.14.1, torchvision 0.29.1, transformers 5.24.0 (CPU). Regenerate with:

    python3 -m venv /tmp/tvref
    /tmp/tvref/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvref/bin/pip install transformers==5.24.0 einops safetensors pillow numpy
    /tmp/tvref/bin/pip install -e . --no-deps
    /tmp/tvref/bin/python scripts/make_image_reference.py
"""

import json
from pathlib import Path

import numpy as np
import PIL
import PIL.Image
import tokenizers
import torch
import torchvision
import transformers
from safetensors.torch import save_file
from transformers import Llama4ImageProcessor, Llama4Processor, PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "image_reference.safetensors"
TILE, PATCH = 28, 7
MAX_PATCHES = (4, 16)
IMAGE_TOKENS = ["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                "<|tile_y_separator|>"]
PROMPT = "<|begin_of_text|>Compare <|image|> with <|image|>: which is brighter?"
PROMPT_IMAGES = ("one_tile_28x28", "tall_90x30")  # a one-tile image, then a many-tile one
GEOMETRY_SIDE = 99  # the tile grid and resized size of every image from 1 x 1 to 99 x 99 px


def smooth(g, h, w):
    """A photo-like uint8 image: a bilinear blow-up of a coarse random grid plus a little noise,
    so resizing averages neighbours that differ (pure noise would hide rounding in the spread)."""
    coarse = torch.rand(1, 3, max(h // 8, 2), max(w // 8, 2), generator=g) * 255
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (up + torch.randn(3, h, w, generator=g) * 8).clamp(0, 255).round().to(torch.uint8)


def noise(g, h, w):
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def make_cases():
    """(name, kind, array) with array in the layout of its kind: tensor [3, y, x], the others [y, x, c]."""
    g = torch.Generator().manual_seed(0)
    hwc = lambda t: t.permute(1, 2, 0).contiguous().numpy()  # noqa: E731
    cases = [
        ("single_pixel_1x1", "tensor", noise(g, 1, 1)),  # upscaled to one tile
        ("tiny_5x7", "tensor", noise(g, 5, 7)),  # upscaled until one side is a tile: 20 x 28
        ("sliver_2x40", "tensor", noise(g, 2, 40)),  # 1 x 2 canvas, height rounds down to 1 px
        ("small_20x14", "tensor", smooth(g, 20, 14)),  # smaller than a tile
        ("one_tile_28x28", "tensor", smooth(g, 28, 28)),  # exactly one tile: no resize at all
        ("wide_28x84", "tensor", smooth(g, 28, 84)),  # exactly 1 x 3 tiles
        ("tall_90x30", "tensor", smooth(g, 90, 30)),
        ("square_83x83", "tensor", smooth(g, 83, 83)),  # canvas 56 x 56: HF resizes to 56 x 55
        ("wide_23x184", "tensor", smooth(g, 23, 184)),  # 1 x 4 canvas: HF resizes to 13 x 112
        ("odd_37x61", "array", hwc(smooth(g, 37, 61))),
        ("large_120x90", "array", hwc(smooth(g, 120, 90))),  # shrinks onto the 2 x 2 canvas at max_patches 4
        ("very_tall_160x24", "tensor", smooth(g, 160, 24)),
        ("noise_97x53", "tensor", noise(g, 97, 53)),
        ("float32_45x70", "tensor", torch.rand(3, 45, 70, generator=g) * 255),  # float 0..255, not rounded
        ("float64_33x50", "array", hwc(smooth(g, 33, 50)).astype(np.float64) * 0.998 + 0.25),  # not integers
        ("int64_40x40", "array", hwc(smooth(g, 40, 40)).astype(np.int64)),  # resized in float, rounded
        ("pil_rgb_60x44", "pil", hwc(smooth(g, 60, 44))),
    ]
    rgba = hwc(smooth(g, 50, 36))
    alpha = np.zeros((50, 36, 1), dtype=np.uint8)
    alpha[:, :18] = 255  # left half opaque, right half transparent, one column half transparent
    alpha[:, 18] = 128
    cases.append(("pil_rgba_50x36", "pil", np.concatenate([rgba, alpha], axis=-1)))
    return cases


def as_input(kind, array):
    if kind == "pil":
        return PIL.Image.fromarray(array)  # RGB or RGBA by the last axis
    return torch.as_tensor(array) if kind == "tensor" else array


def tiny_tokenizer():
    """A word-level tokenizer that knows only the image tokens: enough for Llama4Processor to run."""
    vocab = {"[UNK]": 0, "<|begin_of_text|>": 1, **{t: i + 2 for i, t in enumerate(IMAGE_TOKENS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|begin_of_text|>", *IMAGE_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<|begin_of_text|>")


def expanded_prompt(processor, images, max_patches):
    """Llama4Processor.__call__'s expanded text, rebuilt from the replacement offsets it returns."""
    out = processor(text=PROMPT, images=images, max_patches=max_patches, return_text_replacement_offsets=True)
    text, last = "", 0
    for rep in out["text_replacement_offsets"][0]:
        start, end = rep["span"]
        text += PROMPT[last:start] + rep["replacement"]
        last = end
    return text + PROMPT[last:]


def geometry_table(image_processor, max_patches):
    """[GEOMETRY_SIDE, GEOMETRY_SIDE, 4] int16: for an image of (h + 1) x (w + 1) px, the tile grid
    (rows, cols) and the size it is resized to before padding, as Llama4ImageProcessor does it
    (its resize is wrapped to record the size it is asked for; the first call is the canvas resize)."""
    table = torch.zeros(GEOMETRY_SIDE, GEOMETRY_SIDE, 4, dtype=torch.int16)
    asked = []
    resize = image_processor.resize
    image_processor.resize = lambda image, size, **kw: asked.append((size.height, size.width)) or resize(image, size, **kw)
    try:
        for h in range(1, GEOMETRY_SIDE + 1):
            for w in range(1, GEOMETRY_SIDE + 1):
                asked.clear()
                out = image_processor([torch.zeros(3, h, w, dtype=torch.uint8)], max_patches=max_patches,
                                      input_data_format="channels_first")
                table[h - 1, w - 1] = torch.tensor([*out["aspect_ratios"][0].tolist(), *asked[0]])
    finally:
        del image_processor.resize
    return table


def main():
    size = {"height": TILE, "width": TILE}
    image_processor = Llama4ImageProcessor(size=size)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=PATCH,
                                pixel_shuffle_ratio=0.5)
    tensors, meta_cases = {}, []
    cases = make_cases()
    for name, kind, array in cases:
        tensors[f"in.{name}"] = torch.as_tensor(array).contiguous()
        image = as_input(kind, array)
        fmt = "channels_first" if kind == "tensor" else "channels_last"
        if kind == "pil":
            fmt = None
        for mp in MAX_PATCHES:
            out = image_processor([image], max_patches=mp, input_data_format=fmt, return_tensors="pt")
            tensors[f"out.{name}.mp{mp}.pixel_values"] = out["pixel_values"].contiguous()
            tensors[f"out.{name}.mp{mp}.aspect_ratios"] = out["aspect_ratios"][0].to(torch.int64).contiguous()
        meta_cases.append({"name": name, "kind": kind, "dtype": str(array.dtype)})
    for mp in MAX_PATCHES:
        tensors[f"geometry.mp{mp}"] = geometry_table(image_processor, mp)
    by_name = {name: as_input(kind, array) for name, kind, array in cases}
    prompts = {str(mp): expanded_prompt(processor, [by_name[n] for n in PROMPT_IMAGES], mp) for mp in MAX_PATCHES}
    meta = {
        "cases": json.dumps(meta_cases), "max_patches": json.dumps(MAX_PATCHES), "tile": str(TILE),
        "patch": str(PATCH), "prompt": PROMPT, "prompt_images": json.dumps(PROMPT_IMAGES),
        "prompts": json.dumps(prompts), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "transformers": transformers.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
        "made_by": "scripts/make_image_reference.py",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUT, metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB): {len(cases)} cases x max_patches {MAX_PATCHES}")
    for name, *_ in cases:
        grids = [tuple(tensors[f"out.{name}.mp{mp}.aspect_ratios"].tolist()) for mp in MAX_PATCHES]
        print(f"  {name:20s} grids {grids}")


if __name__ == "__main__":
    main()
