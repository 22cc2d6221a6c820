"""minillama4: a compact, faithful Llama 4 for learning, with an instrumented router.

    import minillama4 as ml4
    model = ml4.Llama4Text.random(ml4.configs.tiny())
    ids = model.generate([[1, 2, 3]], max_new_tokens=8)
    with ml4.RouterTrace(model) as trace:
        model(ids)
    ml4.count_params(ml4.configs.scout()).total   # 108,641,793,536
    mm = ml4.Llama4.random(ml4.configs.tiny_multimodal())   # early fusion: model(ids, pixel_values)

This module imports only torch, einops, numpy and safetensors: no notebook or test dependency.
"""

from . import configs
from .checkpoint import from_pretrained, random_model, save_pretrained
from .config import Llama4Config, TextConfig, VisionConfig
from .generate import generate
from .model import Llama4, Llama4Text
from .params import count_params
from .tokenizer import ByteTokenizer
from .trace import RouterTrace

__version__ = "0.1.0"
__all__ = ["configs", "from_pretrained", "random_model", "save_pretrained", "Llama4Config", "TextConfig",
           "VisionConfig", "generate", "Llama4", "Llama4Text", "count_params", "ByteTokenizer", "RouterTrace"]
