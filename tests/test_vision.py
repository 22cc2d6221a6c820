"""The vision path and early fusion against transformers' Llama4ForConditionalGeneration, the
image processor's tile rules and prompt expansion, and clear errors for bad images.

transformers 5.24's top-level Llama4ForConditionalGeneration.forward raises AttributeError
('image_outputs'), so the reference is composed from its own parts in the order its forward
uses: get_image_features -> multi_modal_projector -> masked_scatter at <|patch|> -> language_model.
(Under transformers 5.17, whose top-level forward runs, the composition equals it exactly and
ours is within 9e-7 of it: checked on both vision configs here, three seeds each.)
"""

import dataclasses
import inspect
import warnings

import pytest
import torch
from helpers import rel_err, small_text

import minillama4 as ml4
from minillama4 import image as img
from minillama4.config import Llama4Config, VisionConfig, to_hf_dict
from minillama4.model import Llama4

transformers = pytest.importorskip("transformers")

PATCH, START, END = 300, 301, 302
VISION = {
    # 56 px tiles, 14 px patches: 4x4 grid, shuffle ratio 0.5 -> 4 tokens per tile
    "r05_56px": VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                             image_size=56, patch_size=14, projector_input_dim=48, projector_output_dim=48,
                             vision_output_dim=48),
    # 64 px tiles, 8 px patches: 8x8 grid, shuffle ratio 0.25 -> 4x4 blocks, 4 tokens per tile
    "r025_64px": VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256,
                              image_size=64, patch_size=8, pixel_shuffle_ratio=0.25, projector_input_dim=40,
                              projector_output_dim=40, vision_output_dim=40, rope_theta=100.0),
}


def hf_pair(vision: VisionConfig, tmp_path, seed=0):
    """A random transformers model, saved with save_pretrained and loaded by us."""
    cfg = Llama4Config(text=small_text(vocab_size=400), vision=vision, image_token_index=PATCH,
                       boi_token_index=START, eoi_token_index=END)
    fields = {k: v for k, v in to_hf_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    hf = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**fields)).eval()
    hf.save_pretrained(tmp_path)
    return hf, ml4.from_pretrained(tmp_path)


def hf_image_features(hf, pixel_values):
    """transformers' vision tower output [tiles, tokens, d]. transformers 5.17's get_image_features
    requires a vision_feature_select_strategy that it does not use; 5.24's has no such argument."""
    kwargs = {}
    if "vision_feature_select_strategy" in inspect.signature(hf.get_image_features).parameters:
        kwargs["vision_feature_select_strategy"] = "default"
    return hf.get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs).last_hidden_state


def hf_logits(hf, ids, pixel_values):
    emb = hf.language_model.model.embed_tokens(ids)
    feats = hf_image_features(hf, pixel_values)
    proj = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
    emb = emb.masked_scatter((ids == PATCH)[..., None], proj)
    return hf.language_model(inputs_embeds=emb).logits


def two_image_prompt(vision, g):
    """Text, a 1x2-tile image (2 tiles + thumbnail), text, a 1-tile image, text."""
    tok = vision.tokens_per_tile
    def expand(grid):
        s = img.image_prompt(grid, tok)
        table = {"<|image_start|>": [START], "<|image_end|>": [END], "<|patch|>": [PATCH],
                 "<|tile_x_separator|>": [303], "<|tile_y_separator|>": [304], "<|image|>": [305]}
        out = []
        for piece in s.replace("|>", "|>\n").split("\n"):
            out += table.get(piece, [])
        return out
    text = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()
    ids = text(5) + expand((1, 2)) + text(4) + expand((1, 1)) + text(6)
    return torch.tensor([ids])


@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_features_projector_and_logits_match(name, tmp_path):
    vision = VISION[name]
    hf, ours = hf_pair(vision, tmp_path)
    assert isinstance(ours, Llama4)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(4, 3, vision.image_size, vision.image_size, generator=g)  # 3 tiles + 1 tile
    ids = two_image_prompt(vision, g)
    assert int((ids == PATCH).sum()) == 4 * vision.tokens_per_tile
    with torch.no_grad():
        ref_feats = hf_image_features(hf, pixels)
        got_feats = ours.vision_model(pixels)
        assert got_feats.shape == (4, vision.tokens_per_tile, vision.projector_output_dim)
        assert rel_err(got_feats, ref_feats) < 1e-4
        ref_proj = hf.multi_modal_projector(ref_feats.reshape(-1, ref_feats.shape[-1]))
        assert rel_err(ours.image_features(pixels), ref_proj) < 1e-4
        assert rel_err(ours(ids, pixel_values=pixels), hf_logits(hf, ids, pixels)) < 1e-4


def test_generate_with_images_matches_transformers_greedy(tmp_path):
    vision = VISION["r05_56px"]
    hf, ours = hf_pair(vision, tmp_path, seed=3)
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(4, 3, 56, 56, generator=g)
    ids = two_image_prompt(vision, g)
    out = ours.generate(ids, 12, pixel_values=pixels)
    ref = ids
    with torch.no_grad():
        for _ in range(12):  # transformers' greedy, full forward each step
            ref = torch.cat([ref, hf_logits(hf, ref, pixels)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_generated_patch_token_is_text(decode):
    """A model may itself emit <|patch|> (image_token_index). The images fill the prompt's slots in
    the prefill; a decode step reads the token as text, as transformers (which passes pixel_values
    only to the first step) does. The eager step raised "no pixel_values were given" here."""
    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
    patch = model.config.image_token_index
    ids = torch.tensor([[20, 21, 22, 23]])
    with torch.no_grad():
        w = model.language_model.lm_head.weight
        w[patch] = 3 * w[int(model(ids)[0, -1].argmax())]  # <|patch|> becomes the greedy next token
        out = model.generate(ids, 4, decode=decode)
        ref = ids
        for _ in range(4):  # the text model's greedy, full forward each step
            ref = torch.cat([ref, model.language_model(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out[0, 4] == patch
    assert torch.equal(out, ref)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_generated_patch_token_after_an_image_prompt_is_text(tmp_path, decode):
    """The same with images in the prompt: they fill the prompt's slots, the generated <|patch|>
    is embedded as text (the reference builds the embeddings by hand over the whole sequence)."""
    vision = VISION["r05_56px"]
    _, ours = hf_pair(vision, tmp_path, seed=3)
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(4, 3, 56, 56, generator=g)
    ids = two_image_prompt(vision, g)
    t = ids.shape[1]
    with torch.no_grad():
        w = ours.language_model.lm_head.weight
        w[PATCH] = 3 * w[int(ours(ids, pixel_values=pixels)[0, -1].argmax())]
        out = ours.generate(ids, 3, pixel_values=pixels, decode=decode)

        def full(seq):  # images in the prompt's slots only
            is_image = torch.zeros_like(seq, dtype=torch.bool)
            is_image[:, :t] = seq[:, :t] == PATCH
            h = ours.language_model.model.embed_tokens(seq).masked_scatter(is_image[..., None],
                                                                           ours.image_features(pixels))
            return ours.language_model(seq, inputs_embeds=h, is_image=is_image)

        ref = ids
        for _ in range(3):
            ref = torch.cat([ref, full(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out[0, t] == PATCH
    assert torch.equal(out, ref)


def test_multimodal_round_trip_and_text_only_load(tmp_path):
    hf, ours = hf_pair(VISION["r05_56px"], tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    for name, t in hf.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    text = ml4.from_pretrained(tmp_path / "ours", text_only=True)
    assert isinstance(text, ml4.Llama4Text)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(text(ids), ours(ids))


def test_trace_marks_image_tokens(tmp_path):
    model = Llama4.random(ml4.configs.tiny_multimodal())
    tok = ml4.ByteTokenizer()
    image = torch.randint(0, 256, (3, 84, 168), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    text, pixels = img.prepare("<|begin_of_text|>Look: <|image|> What is it?", [image], model.config.vision)
    ids = torch.tensor([tok.encode(text)])
    with ml4.RouterTrace(model) as trace:
        model(ids, pixel_values=pixels)
    assert torch.equal(trace.is_image(), (ids == tok.patch_id).flatten())
    assert int(trace.is_image().sum()) == 3 * 9  # 1x2 tiles + thumbnail, 9 tokens each
    assert trace.load(0, mask=trace.is_image()).sum() == 27


def test_image_token_ids_outside_the_vocabulary_are_refused_by_the_multimodal_model():
    cfg = dataclasses.replace(ml4.configs.tiny_multimodal(), boi_token_index=ml4.configs.tiny_multimodal().text.vocab_size)
    for build in (lambda: Llama4(cfg), lambda: Llama4.random(cfg)):
        with pytest.raises(ValueError, match=r"Llama4Config\.boi_token_index=\d+ is not a row of the \d+-token embedding"):
            build()
    # a text-only model does not read the image ids (test_parity loads such a checkpoint text_only=True)
    assert ml4.Llama4Text.random(cfg)(torch.tensor([[1, 2, 3]])).shape == (1, 3, cfg.text.vocab_size)


def test_count_params_includes_vision():
    cfg = ml4.configs.tiny_multimodal()
    assert ml4.count_params(cfg).total == sum(p.numel() for p in Llama4(cfg).parameters())
    assert ml4.count_params(ml4.configs.scout()).part("vision.") == 871_932_416


@pytest.mark.parametrize("hw, grid", [((336, 336), (1, 1)), ((336, 672), (1, 2)), ((672, 336), (2, 1)),
                                      ((100, 80), (1, 1)), ((1000, 1000), (3, 3)), ((200, 1300), (1, 4)),
                                      ((448, 448), (2, 2)), ((5000, 336), (15, 1)),
                                      ((700, 340), (3, 2))])  # 2x1 would shrink 0.96x; 3x2 upscales 1.44x
def test_tile_choice(hw, grid):
    assert img.choose_tiles(*hw, tile=336, max_tiles=16) == grid


def test_preprocess_layout_and_values():
    cfg = ml4.configs.scout().vision
    white = torch.full((3, 336, 672), 255, dtype=torch.uint8)
    tiles, grid = img.preprocess(white, cfg)
    assert grid == (1, 2) and tiles.shape == (3, 3, 336, 336) and tiles.dtype == torch.bfloat16
    assert torch.all(tiles == 1.0)  # 255 -> 1 -> (1 - 0.5) / 0.5
    small = torch.full((3, 100, 200), 255, dtype=torch.uint8)  # upscaled only up to one tile side
    tiles, grid = img.preprocess(small, cfg, dtype=torch.float32)
    assert grid == (1, 1)
    assert img.resized_size(100, 200, 336, 336, 336) == (168, 336)
    assert torch.all(tiles[0, :, :168] == 1.0) and torch.all(tiles[0, :, 168:] == -1.0)  # zero padding -> -1


def test_prompt_expansion():
    one = img.image_prompt((1, 1), 4)
    assert one == "<|image_start|><|image|>" + "<|patch|>" * 4 + "<|image_end|>"
    two = img.image_prompt((2, 2), 3)
    p = "<|patch|>" * 3
    row = p + "<|tile_x_separator|>" + p + "<|tile_y_separator|>"
    assert two == "<|image_start|>" + row + row + "<|image|>" + p + "<|image_end|>"
    cfg = ml4.configs.tiny_multimodal().vision
    images = [torch.zeros(3, 84, 84, dtype=torch.uint8), torch.zeros(3, 84, 252, dtype=torch.uint8)]
    text, pixels = img.prepare("a<|image|>b<|image|>c", images, cfg)
    assert pixels.shape == (1 + 4, 3, 84, 84)  # 1 tile; 1x3 tiles + thumbnail
    assert text.count("<|patch|>") == 5 * cfg.tokens_per_tile and text.count("<|image|>") == 2


def test_bad_images_and_prompts_give_clear_errors():
    model = Llama4.random(ml4.configs.tiny_multimodal())
    cfg = model.config.vision
    tok = ml4.ByteTokenizer()
    with pytest.raises(ValueError, match="channels first"):
        img.preprocess(torch.zeros(84, 84, 3, dtype=torch.uint8)[..., :2], cfg)
    with pytest.raises(ValueError, match="2 <\\|image\\|> placeholders but 1 images"):
        img.prepare("<|image|><|image|>", [torch.zeros(3, 84, 84)], cfg)
    text, pixels = img.prepare("<|image|>", [torch.zeros(3, 84, 84, dtype=torch.uint8)], cfg)
    ids = torch.tensor([tok.encode(text)])
    with pytest.raises(ValueError, match="wrong channel count"):
        model(ids, pixel_values=torch.zeros(1, 4, 84, 84))
    with pytest.raises(ValueError, match="tiles are \\(56, 56\\) pixels but this model takes 84x84"):
        model(ids, pixel_values=torch.zeros(1, 3, 56, 56))
    with pytest.raises(ValueError, match="9 <\\|patch\\|> tokens but the images give 18 features"):
        model(ids, pixel_values=torch.zeros(2, 3, 84, 84))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)
    with pytest.raises(TypeError, match="float tensor"):
        model(ids, pixel_values=torch.zeros(1, 3, 84, 84, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float tensor .* got list"):  # was "'list' object has no attribute 'to'"
        model(ids, pixel_values=[pixels])


def test_non_finite_pixel_values_are_refused_before_the_prefill():
    """One NaN pixel made every logit NaN, and greedy generate returned token 0 without a word."""
    model = Llama4.random(ml4.configs.tiny_multimodal(), seed=0)
    tok = ml4.ByteTokenizer()
    text, pixels = img.prepare("<|image|>", [torch.randint(0, 256, (3, 84, 84), dtype=torch.uint8)],
                               model.config.vision, dtype=torch.float32)
    ids = torch.tensor([tok.encode(text)])
    bad = pixels.clone()
    bad[0, 0, 0, 0], bad[0, 1, 5, 5] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"pixel_values has 2 non-finite values \(NaN or inf\) in 21168: expected "
                                         r"finite normalised pixels, as minillama4.image.prepare returns them"):
        model(ids, pixel_values=bad)
    cache = model.new_cache(1, ids.shape[1] + 3)
    with pytest.raises(ValueError, match="pixel_values has 2 non-finite values"):
        model.generate(ids, 3, pixel_values=bad, cache=cache)
    assert cache.length == 0  # refused before the prefill wrote anything
    one = pixels.clone()
    one[0, 2, 83, 83] = float("-inf")
    with pytest.raises(ValueError, match="pixel_values has 1 non-finite value "):
        model.vision_model(one)  # the vision tower alone checks too
    with torch.no_grad():
        assert model(ids, pixel_values=pixels).isfinite().all()


def test_max_tiles_has_an_upper_bound():
    """candidate_canvases is quadratic in max_tiles: 20,000 took seconds and 10**6 hung."""
    cfg = ml4.configs.tiny_multimodal().vision
    ok = torch.zeros(3, 84, 84, dtype=torch.uint8)
    for call in (lambda: img.candidate_canvases(10**6), lambda: img.choose_tiles(84, 84, 84, max_tiles=257),
                 lambda: img.preprocess(ok, cfg, max_tiles=20000), lambda: img.prepare("<|image|>", [ok], cfg, 10**6)):
        with pytest.raises(ValueError, match=r"max_tiles=\d+: expected a positive int <= 256 \(Llama 4 uses 16\)"):
            call()
    assert len(img.candidate_canvases(img.MAX_TILES)) == sum(len([d for d in range(1, n + 1) if n % d == 0])
                                                            for n in range(1, 257))
    assert img.choose_tiles(84, 84 * 300, 84, max_tiles=256) == (1, 256)


def test_bad_image_values_types_and_arguments_give_clear_errors():
    np = pytest.importorskip("numpy")
    cfg = ml4.configs.tiny_multimodal().vision
    ok = torch.zeros(3, 84, 84, dtype=torch.uint8)
    big = ok.to(torch.int16)
    big[0, 0, 0] = 1000  # used to be clamped to 255 without a word
    with pytest.raises(ValueError, match=r"pixel values from 0 to 1000 \(torch.int16\): expected 0..255"):
        img.preprocess(big, cfg)
    with pytest.raises(ValueError, match="pixel values from -1 to -1"):
        img.preprocess(torch.full((3, 84, 84), -1.0), cfg)
    with pytest.raises(ValueError, match="pixel values from nan"):
        img.preprocess(torch.full((3, 84, 84), float("nan")), cfg)
    with pytest.warns(UserWarning, match=r"values 0..0.5: .*almost black.*image \* 255"):
        img.preprocess(torch.full((3, 84, 84), 0.5), cfg)  # a 0..1 image: processed as given, with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img.preprocess(torch.zeros(3, 84, 84), cfg)  # all black in 0..1 and in 0..255 alike: no warning
    with pytest.raises(ValueError, match=r"image has no pixels: shape \(3, 0, 50\)"):
        img.preprocess(torch.zeros(3, 0, 50, dtype=torch.uint8), cfg)
    with pytest.raises(ValueError, match="max_tiles=0: expected a positive int"):
        img.preprocess(ok, cfg, max_tiles=0)
    with pytest.raises(ValueError, match=r"got shape \(84, 84\); for a grayscale image pass np.stack"):
        img.preprocess(np.zeros((84, 84), dtype=np.uint8), cfg)
    with pytest.raises(ValueError, match=r"array \[height, width, 3\] \(channels last\), got shape \(84, 84, 4\)"):
        img.preprocess(np.zeros((84, 84, 4), dtype=np.uint8), cfg)
    with pytest.raises(TypeError, match="got 'photo.png'; open the file first"):
        img.preprocess("photo.png", cfg)
    with pytest.raises(TypeError, match="a tensor \\[3, height, width\\], got None"):
        img.preprocess(None, cfg)
    with pytest.raises(TypeError, match="dtype torch.bool: expected integer or float pixel values"):
        img.preprocess(ok.bool(), cfg)
    # prepare checks everything before processing any image
    with pytest.raises(TypeError, match="got a Tensor: pass a list of images"):
        img.prepare("<|image|>", ok, cfg)
    with pytest.raises(TypeError, match=r"got Llama4Config \(pass its .vision\)"):
        img.prepare("<|image|>", [ok], ml4.configs.tiny_multimodal())
    with pytest.raises(ValueError, match=r"images\[1\] has pixel values from -1"):
        img.prepare("<|image|><|image|>", [ok, ok.float() - 1], cfg)
    text, pixels = img.prepare("<|image|>", (ok,), cfg)  # a tuple is a list of images too
    assert pixels.shape == (1, 3, 84, 84)
