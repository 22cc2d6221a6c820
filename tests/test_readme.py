"""The README's tour of the package runs as written (its one placeholder, an image, filled in), so
the documented API cannot drift from the code. The "Full Scout on one GPU" block needs a GPU and
real weights: tests/test_gpu.py and tests/test_checkpoint.py cover those calls."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block(after_heading: str) -> str:
    text = README.read_text()
    section = text[text.index(after_heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_package_tour_runs():
    code = _python_block("## What is in the package")
    assert "an_rgb_uint8_tensor" in code  # the placeholder this test fills in
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scope = {"an_rgb_uint8_tensor": image}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["out"].shape[1] == scope["ids"].shape[1] + 20  # generate returns prompt + new tokens
    assert scope["logits"].shape[:2] == (1, len(scope["tok"].encode(scope["text"])))
    assert scope["trace"].expert_ids(layer=0).shape[1] == scope["model"].config.text.num_experts_per_tok
