"""`import minillama4` pulls in no notebook or test dependency."""

import subprocess
import sys

HEAVY = ["transformers", "plotly", "ipywidgets", "jupyterlab", "IPython", "pytest", "tokenizers", "triton"]


def test_import_is_light():
    code = ("import sys, minillama4, minillama4.checkpoint, minillama4.trace, minillama4.data, minillama4.balance, "
            "minillama4.train, minillama4.image, minillama4.vision; "
            f"loaded = [m for m in {HEAVY!r} if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api():
    import minillama4 as ml4

    for name in ("from_pretrained", "Llama4Text", "RouterTrace", "count_params", "configs", "TextConfig"):
        assert hasattr(ml4, name), name
    assert callable(ml4.configs.scout) and callable(ml4.configs.maverick) and callable(ml4.configs.tiny)
