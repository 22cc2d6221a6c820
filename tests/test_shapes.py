"""minillama4.shapes: the synthetic image data set, its prompts, the answer-only loss, training
and evaluation."""

import dataclasses
import math

import pytest
import torch

import minillama4 as ml4
from minillama4 import image, shapes
from minillama4.model import Llama4

VISION = ml4.configs.tiny_multimodal().vision
CFG = shapes.ShapesConfig()
tok = ml4.ByteTokenizer()


# ------------------------------------------------------------------------------ scenes and drawing
def test_sampling_is_seeded_and_respects_splits():
    a, b = shapes.sample_scenes(300, seed=3), shapes.sample_scenes(300, seed=3)
    assert a == b and a != shapes.sample_scenes(300, seed=4)
    assert not {(s.colour, s.shape) for s in a} & set(CFG.holdout)
    assert len({(s.colour, s.shape) for s in a}) == len(CFG.colours) * len(CFG.shapes) - len(CFG.holdout)
    held = shapes.sample_scenes(60, seed=0, split="holdout")
    assert {(s.colour, s.shape) for s in held} == set(CFG.holdout)
    assert {s.position(CFG) for s in a} == set(shapes.POSITIONS)
    for s in a:
        assert CFG.min_size <= s.size <= CFG.max_size
        cx, cy = shapes.cell_centre(s.position(CFG), CFG)
        assert abs(s.x - cx) <= CFG.jitter and abs(s.y - cy) <= CFG.jitter
    with pytest.raises(ValueError, match="split"):
        shapes.sample_scenes(1, split="test")


def test_positions_and_answers():
    assert shapes.cell_centre("top left") == (14, 14) and shapes.cell_centre("bottom right") == (70, 70)
    sc = shapes.Scene("red", "circle", x=70, y=40, size=20)
    assert sc.position() == "right"
    assert [sc.answer(q) for q in shapes.QUESTIONS] == ["red", "circle", "right", "red circle right"]
    assert shapes.Scene("red", "circle", x=0, y=83, size=20).position() == "bottom left"
    assert shapes.Scene("red", "circle", x=28, y=27, size=20).position() == "top"  # cells are 28 px
    with pytest.raises(ValueError, match="question"):
        sc.answer("size")
    assert CFG.chance("colour") == pytest.approx(1 / 6) and CFG.chance("position") == pytest.approx(1 / 9)


def test_config_validation():
    with pytest.raises(ValueError, match="colour"):
        shapes.ShapesConfig(colours=("red", "pink"))
    with pytest.raises(ValueError, match="min_size"):
        shapes.ShapesConfig(max_size=40)
    with pytest.raises(ValueError, match="held-out"):
        shapes.ShapesConfig(colours=("green", "blue"), holdout=(("red", "circle"),))


@pytest.mark.parametrize("shape,area", [("square", 20 * 20), ("circle", math.pi * 10**2),
                                        ("triangle", 20 * 20 / 2), ("plus", 2 * 20 * 20 / 3 - (20 / 3) ** 2)])
def test_shape_masks_have_the_right_area(shape, area):
    (mask,) = shapes.shape_masks([shape], [42], [42], [20], 84)
    assert abs(int(mask.sum()) - area) / area < 0.12
    assert mask[42, 42]  # the centre is inside every shape
    ys, xs = mask.nonzero(as_tuple=True)
    assert 31 <= int(ys.min()) and int(ys.max()) <= 52 and 31 <= int(xs.min()) and int(xs.max()) <= 52
    with pytest.raises(ValueError, match="shape"):
        shapes.shape_masks(["star"], [1], [1], [5], 84)


def test_triangle_points_up():
    (mask,) = shapes.shape_masks(["triangle"], [42], [42], [20], 84)
    widths = mask.sum(1)
    assert widths[33] < widths[42] < widths[51]


def test_draw_puts_the_colour_in_the_shape():
    scenes = [shapes.Scene(c, s, 30, 50, 20) for c in CFG.colours for s in CFG.shapes]
    images = shapes.draw_many(scenes, CFG, seed=1)
    assert images.shape == (len(scenes), 3, 84, 84) and images.dtype == torch.uint8
    assert images.equal(shapes.draw_many(scenes, CFG, seed=1))
    n = len(scenes)
    masks = shapes.shape_masks([s.shape for s in scenes], [30] * n, [50] * n, [20] * n, 84)
    slack = CFG.colour_jitter + CFG.noise
    for im, sc, m in zip(images.int(), scenes, masks):
        inside = im[:, m].float().mean(1)
        assert (inside - torch.tensor(shapes.COLOURS[sc.colour])).abs().max() <= slack
        outside = im[:, ~m]
        assert (outside - CFG.background).abs().max() <= CFG.noise
    assert shapes.draw(scenes[0], CFG, seed=1).equal(shapes.draw_many(scenes[:1], CFG, seed=1)[0])


def test_pixel_values_match_the_processor():
    images = shapes.draw_many(shapes.sample_scenes(5, seed=2), CFG, seed=2)
    fast = shapes.pixel_values(images, VISION)
    slow = torch.cat([image.preprocess(im, VISION)[0] for im in images]).float()
    assert fast.dtype == torch.float32 and fast.equal(slow)
    data = shapes.make_data(7, VISION, CFG, seed=5)
    assert len(data) == 7 and data.pixels.shape == (7, 3, 84, 84) and data.images.dtype == torch.uint8
    assert data.answers("colour") == [s.colour for s in data.scenes]
    with pytest.raises(ValueError, match="tile"):
        shapes.make_data(1, VISION, shapes.ShapesConfig(image_size=90, max_size=24))


# ------------------------------------------------------------------------------ prompts and loss
def test_prompt_layout():
    ids = shapes.prompt_ids("colour", VISION)
    text = tok.decode(ids)
    assert text == ("<|begin_of_text|><|image_start|><|image|>" + "<|patch|>" * 9 + "<|image_end|>colour?")
    assert ids.count(tok.patch_id) == VISION.tokens_per_tile == 9


def test_example_targets_are_the_answer_only():
    sc = shapes.Scene("blue", "square", 14, 70, 18)
    for q in shapes.QUESTIONS:
        ids, targets = shapes.example(sc, q, VISION, CFG)
        assert len(ids) == len(targets)
        kept = [(i, t) for i, t in enumerate(targets) if t != -100]
        assert all(ids[i + 1] == t for i, t in kept)  # target at i is the next token
        assert tok.decode([t for _, t in kept]) == sc.answer(q, CFG) + "<|eot|>"
        assert kept[0][0] == len(shapes.prompt_ids(q, VISION)) - 1  # the question's last token predicts


def test_collate_and_answer_loss():
    sc = shapes.Scene("blue", "square", 14, 70, 18)
    items = [shapes.example(sc, "colour", VISION), shapes.example(sc, "caption", VISION)]
    ids, targets = shapes.collate(items, tok.pad_id)
    assert ids.shape == targets.shape == (2, len(items[1][0]))
    assert (ids[0, len(items[0][0]):] == tok.pad_id).all() and (targets[0, len(items[0][0]):] == -100).all()
    logits = torch.randn(2, ids.shape[1], tok.vocab_size, generator=torch.Generator().manual_seed(0))
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(shapes.answer_loss(logits, targets), expected)
    logits2 = logits.clone()
    logits2[~keep] += 100 * torch.randn_like(logits2[~keep])  # prompt / pad positions do not count
    torch.testing.assert_close(shapes.answer_loss(logits2, targets), expected)


def test_parse_caption_and_confusion():
    assert shapes.parse_caption("red circle top left") == {"colour": "red", "shape": "circle", "position": "top left"}
    assert shapes.parse_caption("red blob") == {"colour": "red", "shape": None, "position": None}
    assert shapes.parse_caption("") == {"colour": None, "shape": None, "position": None}
    m = shapes.confusion(["red", "red", "blue"], ["red", "blue", "teal"], ("red", "blue"))
    assert m.tolist() == [[1, 1, 0], [0, 0, 1]]


# ------------------------------------------------------------------------------ training and asking
def test_training_reduces_the_answer_loss():
    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
    before = [p.detach().clone() for p in model.vision_model.parameters()]
    h = shapes.train_shapes(model, steps=25, batch_size=8, n_train=16, lr=3e-3, warmup=5, log_every=0)
    assert h.step == list(range(25)) and len(h.loss) == len(h.lr) == 25 and h.seconds > 0
    assert sum(h.loss[-5:]) / 5 < 0.6 * sum(h.loss[:5]) / 5
    assert h.lr[4] == pytest.approx(3e-3) and h.lr[-1] == pytest.approx(3e-4)
    # the vision tower trains too (the loss reaches it through the <|patch|> embeddings)
    assert any(not p.equal(q) for p, q in zip(model.vision_model.parameters(), before))
    assert set(h.to_dict()) == {"step", "loss", "lr", "seconds", "cpu_seconds"} and h.cpu_seconds > 0


def test_switch_aux_changes_the_update_not_the_recorded_loss():
    runs = []
    for coef in (0.0, 1.0):
        model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
        h = shapes.train_shapes(model, steps=2, batch_size=4, n_train=8, log_every=0, switch_aux=coef)
        runs.append((h.loss, model.language_model.model.layers[0].feed_forward.router.weight.detach().clone()))
    assert runs[0][0][0] == runs[1][0][0]  # the first step's answer loss is measured before any update
    assert not torch.equal(runs[0][1], runs[1][1])


def test_training_settings_are_checked_before_training():
    with pytest.raises(ValueError, match=r"questions\[1\]='size': expected one of \('colour', 'shape'"):
        shapes.ShapesTrainConfig(questions=("colour", "size"))
    with pytest.raises(ValueError, match="switch_aux=nan"):
        shapes.ShapesTrainConfig(switch_aux=float("nan"))  # NaN passed `if cfg.switch_aux:` and trained on
    with pytest.raises(ValueError, match="lr=0"):
        shapes.ShapesTrainConfig(lr=0)
    with pytest.raises(TypeError, match="steps=2.5"):
        shapes.ShapesTrainConfig(steps=2.5)
    with pytest.raises(TypeError, match=r"unknown settings \['stpes'\]"):
        shapes.train_shapes(None, stpes=3)
    with pytest.raises(TypeError, match="model must be a Llama4"):
        shapes.train_shapes(ml4.Llama4Text.random(ml4.configs.tiny(), seed=0), steps=1)
    # the settings as history.json stores them (lists) are accepted
    shapes.ShapesTrainConfig(**{**dataclasses.asdict(shapes.ShapesTrainConfig()), "betas": [0.9, 0.95],
                                "questions": ["colour", "shape", "position"]})


def test_training_stops_at_a_non_finite_loss():
    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
    with torch.no_grad():
        model.language_model.lm_head.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="step 0"):
        shapes.train_shapes(model, steps=3, batch_size=2, n_train=4, log_every=0)
    for n, p in model.named_parameters():  # stopped before the update
        torch.testing.assert_close(p, before[n], rtol=0, atol=0, equal_nan=True)


def test_ask_and_evaluate_with_a_random_model():
    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
    data = shapes.make_data(5, VISION, CFG, seed=9)
    said = shapes.ask(model, data.pixels, "colour", max_new_tokens=4, batch_size=2)
    assert len(said) == 5 and all(isinstance(a, str) for a in said)
    assert said == shapes.ask(model, data.pixels, "colour", max_new_tokens=4)  # batching does not matter
    result = shapes.evaluate_attributes(model, data, questions=("shape", "caption"))
    assert result["answers"]["shape"] == shapes.ask(model, data.pixels, "shape")
    assert len(result["answers"]["caption"]) == 5


def test_evaluate_attributes_counts_known_answers(monkeypatch):
    """A model whose answers are known: it recognises each image by its pixels and says what the
    table below holds for it, so every count is known by hand."""
    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
    data = shapes.make_data(5, VISION, CFG, seed=9)
    assert [sc.answer("caption") for sc in data.scenes] == [
        "green circle right", "orange triangle bottom", "yellow plus bottom", "yellow triangle bottom",
        "yellow triangle top right"]
    said = {"shape": ["circle", "circle", "plus", "triangle", "square"],  # 3 right (images 0, 2, 3)
            "caption": ["green circle right",  # exact
                        "red triangle bottom",  # wrong colour
                        "yellow plus top",  # wrong position
                        "yellow triangle bottom",  # exact
                        "yellow blob"]}  # right colour only
    prompts = {q: shapes.prompt_ids(q, VISION) for q in said}
    calls = []

    def generate(ids, max_new_tokens, pixel_values=None, stop_tokens=None):
        question = next(q for q, p in prompts.items() if ids.tolist() == [p] * len(ids))
        assert list(stop_tokens) == [tok.eot_id] and pixel_values.shape[0] == len(ids)
        images = [next(i for i in range(len(data)) if torch.equal(px, data.pixels[i])) for px in pixel_values]
        calls.append((question, images))
        new = [tok.encode(said[question][i]) + [tok.eot_id] for i in images]
        width = max(len(n) for n in new)
        return torch.cat([ids, torch.tensor([n + [tok.eot_id] * (width - len(n)) for n in new])], 1)

    monkeypatch.setattr(model, "generate", generate)
    assert shapes.ask(model, data.pixels, "shape", batch_size=2) == said["shape"]
    assert calls == [("shape", [0, 1]), ("shape", [2, 3]), ("shape", [4])]
    result = shapes.evaluate_attributes(model, data, questions=("shape", "caption"))
    assert result["shape"] == {"correct": 3, "total": 5, "accuracy": 0.6, "chance": 0.25}
    assert result["caption"] == {"correct": 2, "total": 5, "accuracy": 0.4,
                                 "colour": {"correct": 4, "accuracy": 0.8},
                                 "shape": {"correct": 4, "accuracy": 0.8},
                                 "position": {"correct": 3, "accuracy": 0.6}}
    assert result["answers"] == said


# ------------------------------------------------------------------------------ looking inside, caching
def test_object_attention_measures_the_objects_token():
    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
    data = shapes.make_data(6, VISION, CFG, seed=4)
    share = shapes.object_attention(model, data, "shape")
    assert share.shape == (4, ml4.configs.tiny_multimodal().text.num_attention_heads)
    assert ((share >= 0) & (share <= 1)).all()
    # brute force for layer 2: the weights of the last query on the image tokens, renormalised
    from minillama4.attention_maps import record_attention

    ids = torch.tensor([shapes.prompt_ids("shape", VISION)] * 6)
    maps = record_attention(model, ids, pixel_values=data.pixels, layers=[2])
    expected = []
    for b, sc in enumerate(data.scenes):
        grid = maps.to_image(2, batch=b)[:, 0]  # [h, 3, 3]
        row, col = divmod(shapes.POSITIONS.index(sc.position(CFG)), 3)
        expected.append(grid[:, row, col] / grid.sum((1, 2)))
    torch.testing.assert_close(share[2], torch.stack(expected).mean(0))


def test_questions_layers_and_empty_data_are_refused_by_name():
    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
    data = shapes.make_data(2, VISION, CFG, seed=4)
    with pytest.raises(ValueError, match=r"question='size': expected one of \('colour', 'shape', 'position'"):
        shapes.prompt_ids("size", VISION)
    with pytest.raises(ValueError, match="question='size'"):
        shapes.object_attention(model, data, "size")
    with pytest.raises(ValueError, match=r"layers=\[99\]: \[99\] not a layer"):
        shapes.object_attention(model, data, "shape", layers=[99])
    with pytest.raises(ValueError, match=r"questions\[1\]='size'"):
        shapes.evaluate_attributes(model, data, ("colour", "size"))
    with pytest.raises(ValueError, match="data has 0 images"):
        shapes.evaluate_attributes(model, shapes.make_data(0, VISION, CFG))


def test_routing_by_modality():
    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
    data = shapes.make_data(4, VISION, CFG, seed=4)
    ids = torch.tensor([shapes.prompt_ids("colour", VISION)] * 4)
    with ml4.RouterTrace(model) as trace:
        model(ids, pixel_values=data.pixels)
    img, txt = shapes.modality_loads(trace)
    assert (img.sum(1) == 36).all() and (txt.sum(1) == ids.numel() - 36).all()
    sep = shapes.routing_separation(trace)
    p, q = img[0] / 36, txt[0] / (ids.numel() - 36)
    assert sep.shape == (4,) and sep[0].item() == pytest.approx(0.5 * float((p - q).abs().sum()))
    assert ((sep >= 0) & (sep <= 1)).all()


def test_train_and_save_round_trip(tmp_path):
    model, record = shapes.train_and_save(tmp_path, shapes.ShapesTrainConfig(steps=3, batch_size=4, n_train=8,
                                                                             log_every=0))
    assert (tmp_path / "model.safetensors").exists() and record["train_config"]["steps"] == 3
    loaded, rec = shapes.load_trained(tmp_path)
    assert rec["loss"] == record["loss"] and rec["shapes_config"]["holdout"] == [list(p) for p in CFG.holdout]
    data = shapes.make_data(2, VISION, CFG, seed=0)
    ids = torch.tensor([shapes.prompt_ids("colour", VISION)] * 2)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=data.pixels), model(ids, pixel_values=data.pixels))


def test_new_modules_import_light():
    import subprocess
    import sys

    code = ("import sys, minillama4.shapes, minillama4.attention_maps; "
            "heavy = [m for m in ('plotly', 'ipywidgets', 'transformers', 'IPython') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prior_loss_is_the_loss_of_an_image_blind_model():
    one = shapes.prior_loss(CFG, ("position",))
    lengths = [len(p) + 1 for p in shapes.POSITIONS]
    assert one == pytest.approx(math.log(9) / (sum(lengths) / 9))
    # colour in training: 6 colours, red has 3 of its 4 shapes, blue 3, yellow 3 (one pair each held out)
    pairs = CFG.pairs("train")
    probs = {c: sum(p[0] == c for p in pairs) / len(pairs) for c in CFG.colours}
    h = -sum(p * math.log(p) for p in probs.values())
    t = sum(p * (len(c) + 1) for c, p in probs.items())
    assert shapes.prior_loss(CFG, ("colour",)) == pytest.approx(h / t)
    assert 0.2 < shapes.prior_loss(CFG) < 0.3
    with pytest.raises(ValueError, match="attribute"):
        shapes.prior_loss(CFG, ("caption",))
