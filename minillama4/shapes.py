"""Shapes: an offline, seeded image data set for early fusion, and a small multimodal trainer.

Each image is one coloured shape on a noisy dark background, drawn with torch (no files, no
downloads). The scene has three attributes, so captions are compositional:

    colour    red, green, blue, yellow, purple, orange          (6: chance 1/6)
    shape     square, circle, triangle, plus                     (4: chance 1/4)
    position  the cell of a 3x3 grid holding the shape's centre  (9: chance 1/9)
              top left, top, top right, left, centre, right, bottom left, bottom, bottom right

    caption   "red circle top left"

At 84 x 84 pixels an image is exactly one tile of `configs.tiny_multimodal()`: a 6x6 grid of
14 px patches, pixel-shuffled into 3x3 = 9 tokens of 28 x 28 px, one token per grid cell.

Questions follow the image in the prompt (text after the image can attend to it; the causal
mask hides later tokens from earlier ones):

    <|begin_of_text|><|image_start|><|image|><|patch|> x 9<|image_end|>colour?   ->   red<|eot|>

`train_shapes` trains a `Llama4` on such sequences with the loss on the answer tokens only
(by default the three attribute questions: a `describe:` caption runs past position 32, where
the tiny preset's chunked RoPE layers no longer see the image); `evaluate_attributes` asks every
question of a test set (greedy decoding) and counts exact answers. Some (colour, shape) pairs are
held out of training entirely (`ShapesConfig.holdout`) to test whether the model composes
attributes it saw only separately. `train_and_save` / `load_trained` cache a trained model for
notebook 04; `object_attention` and `routing_separation` look inside it.

Simplifications: one shape per image, no occlusion, flat colours with uniform noise; the 3x3
position grid is chosen to coincide with the pixel-shuffled token grid (a shape near a cell
border spills into the neighbouring token); byte-level answers (the real model has BPE).

Axes: n images, c colour channels, y x pixel rows / columns, b batch, t tokens, v vocab.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

from . import image as image_lib
from .checks import check_choice, check_finite_loss, check_int, check_real, check_type
from .config import VisionConfig
from .tokenizer import ByteTokenizer

COLOURS = {  # name -> RGB fill (0..255)
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 100, 240),
    "yellow": (235, 215, 40), "purple": (160, 70, 210), "orange": (245, 140, 30),
}
SHAPES = ("square", "circle", "triangle", "plus")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
ATTRIBUTES = ("colour", "shape", "position")
QUESTIONS = {"colour": "colour?", "shape": "shape?", "position": "where?", "caption": "describe:"}


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 84  # image side in pixels (one tile of tiny_multimodal)
    grid: int = 3  # positions: a grid x grid layout of cells (3 x 3 = the pixel-shuffled token grid)
    colours: tuple[str, ...] = tuple(COLOURS)  # colour names used (keys of COLOURS)
    shapes: tuple[str, ...] = SHAPES  # shape names used
    min_size: int = 16  # smallest shape side / diameter in pixels
    max_size: int = 24  # largest shape side / diameter in pixels
    jitter: int = 4  # the shape's centre is up to this many pixels from its cell's centre (each axis)
    colour_jitter: int = 20  # each fill channel is shifted by up to +-this
    background: int = 35  # mean background grey level
    noise: int = 15  # every pixel gets uniform noise in +-this
    # (colour, shape) pairs never drawn for training: a test of compositional generalisation
    holdout: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "plus"), ("yellow", "circle"))

    def __post_init__(self):
        for c in self.colours:
            if c not in COLOURS:
                raise ValueError(f"unknown colour {c!r}; choose from {list(COLOURS)}")
        for s in self.shapes:
            if s not in SHAPES:
                raise ValueError(f"unknown shape {s!r}; choose from {list(SHAPES)}")
        if self.grid != 3:
            raise ValueError("grid must be 3: the position names describe a 3x3 grid")
        if not 4 <= self.min_size <= self.max_size <= self.image_size // self.grid:
            raise ValueError(f"need 4 <= min_size <= max_size <= cell size {self.image_size // self.grid}")
        for c, s in self.holdout:
            if c not in self.colours or s not in self.shapes:
                raise ValueError(f"held-out pair {(c, s)} uses a colour or shape not in the config")

    @property
    def cell(self) -> int:
        """Side of one position cell in pixels."""
        return self.image_size // self.grid

    def options(self, attribute: str) -> tuple[str, ...]:
        """Every possible answer for an attribute ("colour", "shape" or "position")."""
        return {"colour": self.colours, "shape": self.shapes, "position": POSITIONS}[attribute]

    def chance(self, attribute: str) -> float:
        """Accuracy of a uniform guess: 1 / number of options."""
        return 1 / len(self.options(attribute))

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """(colour, shape) pairs of a split: "train" (all but the held-out ones), "holdout", "all"."""
        every = [(c, s) for c in self.colours for s in self.shapes]
        if split == "all":
            return every
        if split == "train":
            return [p for p in every if p not in self.holdout]
        if split == "holdout":
            return list(self.holdout)
        raise ValueError(f"split={split!r}: expected 'train', 'holdout' or 'all'")


@dataclass(frozen=True)
class Scene:
    colour: str  # a COLOURS name
    shape: str  # a SHAPES name
    x: int  # centre column in pixels
    y: int  # centre row in pixels
    size: int  # side / diameter in pixels

    def position(self, cfg: ShapesConfig = ShapesConfig()) -> str:
        """The name of the grid cell holding the centre."""
        row = min(max(self.y, 0) // cfg.cell, cfg.grid - 1)
        col = min(max(self.x, 0) // cfg.cell, cfg.grid - 1)
        return POSITIONS[row * cfg.grid + col]

    def answer(self, question: str, cfg: ShapesConfig = ShapesConfig()) -> str:
        """The correct answer to a QUESTIONS key: an attribute, or "caption" for all three."""
        if question == "colour":
            return self.colour
        if question == "shape":
            return self.shape
        if question == "position":
            return self.position(cfg)
        if question == "caption":
            return f"{self.colour} {self.shape} {self.position(cfg)}"
        raise ValueError(f"question={question!r}: expected one of {list(QUESTIONS)}")


def cell_centre(position: str, cfg: ShapesConfig = ShapesConfig()) -> tuple[int, int]:
    """(x, y) pixel centre of a named cell."""
    i = POSITIONS.index(position)
    row, col = divmod(i, cfg.grid)
    return col * cfg.cell + cfg.cell // 2, row * cfg.cell + cfg.cell // 2


def sample_scenes(n: int, cfg: ShapesConfig = ShapesConfig(), seed: int = 0, split: str = "train") -> list[Scene]:
    """n random scenes: a uniform (colour, shape) pair of the split, a uniform cell, a size and a
    jittered centre. The same (n, cfg, seed, split) always gives the same scenes."""
    g = torch.Generator().manual_seed(seed)
    pairs = cfg.pairs(split)
    pair = torch.randint(len(pairs), (n,), generator=g)
    cell = torch.randint(cfg.grid * cfg.grid, (n,), generator=g)
    size = torch.randint(cfg.min_size, cfg.max_size + 1, (n,), generator=g)
    offset = torch.randint(-cfg.jitter, cfg.jitter + 1, (n, 2), generator=g)
    scenes = []
    for i in range(n):
        x, y = cell_centre(POSITIONS[int(cell[i])], cfg)
        colour, shape = pairs[int(pair[i])]
        scenes.append(Scene(colour, shape, x + int(offset[i, 0]), y + int(offset[i, 1]), int(size[i])))
    return scenes


def _mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside test of one shape kind: dx [n, 1, x], dy [n, y, 1] pixel offsets from the centres,
    r [n, 1, 1] half-sizes -> [n, y, x]."""
    if shape == "square":
        return (dx.abs() <= r) & (dy.abs() <= r)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "triangle":  # apex up: the half-width grows from 0 at the top edge to r at the bottom
        return (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)
    if shape == "plus":  # two bars, each a third of the size thick
        bar = r / 3
        return ((dx.abs() <= bar) & (dy.abs() <= r)) | ((dy.abs() <= bar) & (dx.abs() <= r))
    raise ValueError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")


def shape_masks(shapes: list[str], x, y, size, image_size: int) -> torch.Tensor:
    """Boolean [n, y, x] masks: shape i centred at (x[i], y[i]) with side / diameter size[i] px."""
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
    x, y, r = (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (x, y, size))
    out = torch.zeros(len(shapes), image_size, image_size, dtype=torch.bool)
    for name in dict.fromkeys(shapes):  # each shape kind once, in first-seen order
        rows = torch.tensor([i for i, s in enumerate(shapes) if s == name])
        dx, dy = coords[None, None, :] - x[rows], coords[None, :, None] - y[rows]
        out[rows] = _mask(name, dx, dy, r[rows] / 2)
    return out


def draw_many(scenes: list[Scene], cfg: ShapesConfig = ShapesConfig(), seed: int = 0,
              chunk: int = 512) -> torch.Tensor:
    """Scenes -> uint8 images [n, c, y, x] (channels first, like minillama4.image expects):
    background grey + uniform noise everywhere, the jittered fill colour (+ the same noise) inside
    the shape. Seeded: the same scenes and seed give the same pixels."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    out = torch.empty(len(scenes), 3, s, s, dtype=torch.uint8)
    for lo in range(0, len(scenes), chunk):
        part = scenes[lo:lo + chunk]
        n = len(part)
        noise = torch.randint(-cfg.noise, cfg.noise + 1, (n, 3, s, s), generator=g, dtype=torch.int16)
        fill = torch.tensor([COLOURS[sc.colour] for sc in part], dtype=torch.int16)
        fill = fill + torch.randint(-cfg.colour_jitter, cfg.colour_jitter + 1, (n, 3), generator=g, dtype=torch.int16)
        mask = shape_masks([sc.shape for sc in part], [sc.x for sc in part], [sc.y for sc in part],
                           [sc.size for sc in part], s)
        base = torch.where(rearrange(mask, "n y x -> n 1 y x"), rearrange(fill, "n c -> n c 1 1"),
                           torch.tensor(cfg.background, dtype=torch.int16))
        out[lo:lo + n] = (base + noise).clamp(0, 255).to(torch.uint8)
    return out


def draw(scene: Scene, cfg: ShapesConfig = ShapesConfig(), seed: int = 0) -> torch.Tensor:
    """One scene -> uint8 image [c, y, x]."""
    return draw_many([scene], cfg, seed)[0]


# ------------------------------------------------------------------------------ prompts
def image_text(vision: VisionConfig, image_size: int = 84) -> str:
    """The expanded text one image_size x image_size image stands for (see minillama4.image)."""
    grid = image_lib.choose_tiles(image_size, image_size, vision.image_size)
    return image_lib.image_prompt(grid, vision.tokens_per_tile)


def prompt_ids(question: str, vision: VisionConfig, tokenizer: ByteTokenizer | None = None,
               image_size: int = 84) -> list[int]:
    """Token ids of <|begin_of_text|> + the expanded image + the question text."""
    check_choice("question", question, QUESTIONS)
    tok = tokenizer or ByteTokenizer()
    return tok.encode("<|begin_of_text|>" + image_text(vision, image_size) + QUESTIONS[question])


def pixel_values(images: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
    """uint8 images [n, c, y, x] -> float32 tiles [n * tiles, c, S, S] as the Llama 4 processor
    makes them (minillama4.image.preprocess). Tile-sized images need no resize, padding or
    thumbnail: all that is left is (x / 255 - 0.5) / 0.5 in bf16, done here for the whole batch
    at once (tests/test_shapes.py checks it against preprocess)."""
    s = vision.image_size
    if tuple(images.shape[-2:]) != (s, s):
        return torch.cat([image_lib.preprocess(im, vision)[0] for im in images]).float()
    return ((images.to(torch.bfloat16) * (1 / 255) - 0.5) / 0.5).float()


@dataclass
class ShapesData:
    """A drawn split: scenes, uint8 images and the processed tiles the model takes."""

    scenes: list[Scene]  # n scenes
    images: torch.Tensor  # [n, c, y, x] uint8
    pixels: torch.Tensor  # [n, c, S, S] float32 (one tile per image)
    cfg: ShapesConfig  # how they were drawn

    def __len__(self) -> int:
        return len(self.scenes)

    def answers(self, question: str) -> list[str]:
        return [sc.answer(question, self.cfg) for sc in self.scenes]


def make_data(n: int, vision: VisionConfig, cfg: ShapesConfig = ShapesConfig(), seed: int = 0,
              split: str = "train") -> ShapesData:
    """Sample, draw and preprocess n images of a split ("train", "holdout" or "all")."""
    if cfg.image_size != vision.image_size:
        raise ValueError(f"images of {cfg.image_size} px do not make one {vision.image_size} px tile")
    scenes = sample_scenes(n, cfg, seed, split)
    images = draw_many(scenes, cfg, seed)
    return ShapesData(scenes, images, pixel_values(images, vision), cfg)


def example(scene: Scene, question: str, vision: VisionConfig, cfg: ShapesConfig = ShapesConfig(),
            tokenizer: ByteTokenizer | None = None) -> tuple[list[int], list[int]]:
    """(ids, targets) of one training sequence: prompt + answer + <|eot|>. targets[i] is the token
    to predict at position i (ids[i + 1]) on answer positions and -100 (ignored) elsewhere."""
    tok = tokenizer or ByteTokenizer()
    prompt = prompt_ids(question, vision, tok, cfg.image_size)
    answer = tok.encode(scene.answer(question, cfg)) + [tok.eot_id]
    ids = prompt + answer
    targets = [-100] * (len(prompt) - 1) + answer + [-100]
    return ids, targets


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, targets) pairs to one length -> ids [b, t], targets [b, t]. Padding after the
    answer changes nothing before it (causal attention), and its targets are ignored."""
    t = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), t), pad_id, dtype=torch.long)
    targets = torch.full((len(items), t), -100, dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, :len(x)], targets[i, :len(y)] = torch.tensor(x), torch.tensor(y)
    return ids, targets


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens only: logits [b, t, v], targets [b, t] (-100 = skip)."""
    return F.cross_entropy(rearrange(logits.float(), "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"),
                           ignore_index=-100)


def prior_loss(cfg: ShapesConfig = ShapesConfig(), questions=("colour", "shape", "position"),
               tokenizer: ByteTokenizer | None = None) -> float:
    """The answer loss (nats per answer token, as `answer_loss` averages it) of the best model that
    never looks at the image: it knows how often each answer occurs in training and spells it
    perfectly. Per question q with answer distribution p_q (training pairs, uniform cells):

        loss = sum_q H(p_q) / sum_q E_q[answer tokens + 1]        (H = -sum p log p; +1 for <|eot|>)

    A training curve that sits at this level has not learned to use the image yet."""
    tok = tokenizer or ByteTokenizer()
    pairs = cfg.pairs("train")
    entropy = tokens = 0.0
    for q in questions:
        if q == "position":
            answers = list(POSITIONS)
        elif q in ("colour", "shape"):
            answers = [c if q == "colour" else s for c, s in pairs]
        else:
            raise ValueError(f"prior_loss covers the attribute questions, not {q!r}")
        probs = {a: answers.count(a) / len(answers) for a in set(answers)}
        entropy -= sum(p * math.log(p) for p in probs.values())
        tokens += sum(p * (len(tok.encode(a)) + 1) for a, p in probs.items())
    return entropy / tokens


# ------------------------------------------------------------------------------ training
@dataclass
class ShapesTrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # sequences (images) per step
    lr: float = 1e-3  # peak learning rate (AdamW)
    warmup: int = 40  # steps of linear warmup
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.05  # AdamW weight decay on matrices only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    n_train: int = 4096  # training images (drawn once, then sampled with replacement)
    questions: tuple[str, ...] = ("colour", "shape", "position")  # asked uniformly at random
    switch_aux: float = 0.0  # coefficient of the Switch load-balancing loss (0 = off; minillama4.balance)
    seed: int = 0  # data and batch-order seed (the model's init has its own)
    log_every: int = 100  # print a line every this many steps (0 = silent)

    def __post_init__(self):
        for name in ("steps", "batch_size", "n_train"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup", "seed", "log_every"):
            check_int(name, getattr(self, name), 0)
        check_real("lr", self.lr, low=0, low_open=True)
        check_real("min_lr_ratio", self.min_lr_ratio, 0, 1)
        # NaN coefficients used to pass `if cfg.switch_aux:` and train on NaN weights
        for name in ("weight_decay", "grad_clip", "switch_aux"):
            check_real(name, getattr(self, name), low=0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"betas={self.betas!r}: expected two numbers in [0, 1), e.g. (0.9, 0.95)")
        for i, beta in enumerate(self.betas):
            check_real(f"betas[{i}]", beta, 0, 1, high_open=True)
        _check_questions(self.questions, QUESTIONS)


def _check_questions(questions, valid) -> None:
    """A non-empty list of question names, each one of `valid` (a KeyError used to name only the bad one)."""
    if isinstance(questions, str) or not isinstance(questions, (tuple, list)):
        raise TypeError(f"questions={questions!r}: expected a tuple of question names from {tuple(valid)}")
    if not questions:
        raise ValueError(f"questions=(): expected at least one of {tuple(valid)}")
    for i, q in enumerate(questions):
        check_choice(f"questions[{i}]", q, valid)


def _check_model(model) -> None:
    from .model import Llama4

    check_type("model", model, Llama4, "a multimodal Llama4, e.g. Llama4.random(configs.tiny_multimodal())")


def _check_data(data) -> None:
    check_type("data", data, ShapesData, "make one with shapes.make_data(n, vision)")
    if len(data) == 0:  # accuracies of 0 images read as 0.0, not as "nothing asked"
        raise ValueError("data has 0 images: nothing to ask about (make_data(n, ...) with n >= 1)")


@dataclass
class ShapesHistory:
    step: list[int] = field(default_factory=list)  # step number, from 0
    loss: list[float] = field(default_factory=list)  # answer-token cross-entropy of the batch (nats/token)
    lr: list[float] = field(default_factory=list)  # learning rate used by the step
    seconds: float = 0.0  # wall time of the run
    cpu_seconds: float = 0.0  # CPU time of this process during the run, all threads (honest on a busy machine)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_shapes(model, cfg: ShapesTrainConfig | None = None, shapes_cfg: ShapesConfig = ShapesConfig(),
                 **overrides) -> ShapesHistory:
    """Train a multimodal `Llama4` in place to answer QUESTIONS about ShapesData images.

    One step: b images of the training split with a random question each -> prompt + answer +
    <|eot|> -> cross-entropy on the answer tokens (`answer_loss`) -> backward -> clip -> AdamW with
    warmup + cosine (minillama4.train.lr_at). Vision tower, projector and language model all train.
    No balancing loss by default (routing settles on its own); cfg.switch_aux > 0 adds the Switch
    loss. `history.loss` is always the answer loss alone."""
    from .balance import balancing_losses
    from .train.loop import lr_at, param_groups

    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ShapesTrainConfig)})
    if unknown:
        raise TypeError(f"train_shapes got unknown settings {unknown}: keyword overrides are ShapesTrainConfig fields")
    if cfg is not None:
        check_type("cfg", cfg, ShapesTrainConfig)
    cfg = dataclasses.replace(cfg or ShapesTrainConfig(), **overrides)
    check_type("shapes_cfg", shapes_cfg, ShapesConfig)
    _check_model(model)
    vision = model.config.vision
    tok = ByteTokenizer()
    data = make_data(cfg.n_train, vision, shapes_cfg, cfg.seed, "train")
    examples = {q: [example(sc, q, vision, shapes_cfg, tok) for sc in data.scenes] for q in cfg.questions}
    g = torch.Generator().manual_seed(cfg.seed + 1)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    history, start, cpu_start, was_training = ShapesHistory(), time.perf_counter(), time.process_time(), model.training
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g).tolist()
        qs = torch.randint(len(cfg.questions), (cfg.batch_size,), generator=g).tolist()
        ids, targets = collate([examples[cfg.questions[q]][i] for i, q in zip(idx, qs)], tok.pad_id)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        router_outputs = []
        loss = answer_loss(model(ids, pixel_values=data.pixels[idx], router_outputs=router_outputs), targets)
        total = loss
        if cfg.switch_aux:  # Switch Transformer auxiliary loss, mean over MoE layers (Fedus et al. 2021, eq. 4)
            total = loss + cfg.switch_aux * balancing_losses(router_outputs)["switch_aux"]
        check_finite_loss(total.item(), step)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        history.step.append(step)
        history.loss.append(loss.item())
        history.lr.append(lr)
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step == cfg.steps - 1):
            print(f"step {step + 1}/{cfg.steps} loss {loss.item():.3f} lr {lr:.1e}")
    model.train(was_training)
    history.seconds = time.perf_counter() - start
    history.cpu_seconds = time.process_time() - cpu_start
    return history


# ------------------------------------------------------------------------------ asking questions
@torch.no_grad()
def ask(model, pixels: torch.Tensor, question: str, max_new_tokens: int = 32, batch_size: int = 256,
        tokenizer: ByteTokenizer | None = None) -> list[str]:
    """Greedy answers of the model to one question for each image (pixels [n, c, S, S], one tile
    each), decoded up to <|eot|>. Same-question prompts have the same length, so they batch."""
    _check_model(model)
    check_choice("question", question, QUESTIONS)
    check_int("batch_size", batch_size, 1)
    tok = tokenizer or ByteTokenizer()
    prompt = prompt_ids(question, model.config.vision, tok, model.config.vision.image_size)
    was_training = model.training
    model.eval()
    answers = []
    for lo in range(0, pixels.shape[0], batch_size):
        px = pixels[lo:lo + batch_size]
        ids = torch.tensor([prompt] * px.shape[0])
        out = model.generate(ids, max_new_tokens, pixel_values=px, stop_tokens=[tok.eot_id])
        for row in out[:, len(prompt):].tolist():
            row = row[:row.index(tok.eot_id)] if tok.eot_id in row else row
            answers.append(tok.decode(row, skip_special=True))
    model.train(was_training)
    return answers


def parse_caption(caption: str, cfg: ShapesConfig = ShapesConfig()) -> dict[str, str | None]:
    """"red circle top left" -> {"colour": "red", "shape": "circle", "position": "top left"};
    a part that is not a known option becomes None."""
    words = caption.split(" ", 2) + [None, None, None]
    colour, shape, position = words[:3]
    return {"colour": colour if colour in cfg.colours else None,
            "shape": shape if shape in cfg.shapes else None,
            "position": position if position in POSITIONS else None}


def evaluate_attributes(model, data: ShapesData, questions=("colour", "shape", "position", "caption")) -> dict:
    """Ask every question about every image. Returns, per attribute question, {"correct": int,
    "total": int, "accuracy": float, "chance": float}; for "caption" also the exact-match counts
    and per-attribute counts read from the caption (`parse_caption`); and "answers": {question:
    [model answer per image]} for inspection."""
    _check_model(model)
    _check_data(data)
    _check_questions(questions, QUESTIONS)  # all of them, before the first (slow) round of questions
    result, answers = {}, {}
    for q in questions:
        said = ask(model, data.pixels, q)
        answers[q] = said
        truth = data.answers(q)
        correct = sum(a == b for a, b in zip(said, truth))
        entry = {"correct": correct, "total": len(truth), "accuracy": correct / max(len(truth), 1)}
        if q in ATTRIBUTES:
            entry["chance"] = data.cfg.chance(q)
        else:  # caption: also score each attribute inside it
            parsed = [parse_caption(a, data.cfg) for a in said]
            for attr in ATTRIBUTES:
                hits = sum(p[attr] == sc.answer(attr, data.cfg) for p, sc in zip(parsed, data.scenes))
                entry[attr] = {"correct": hits, "accuracy": hits / max(len(truth), 1)}
        result[q] = entry
    result["answers"] = answers
    return result


def confusion(truth: list[str], said: list[str], options: tuple[str, ...]) -> torch.Tensor:
    """[options, options + 1] counts: row = true answer, column = model answer (last column:
    anything that is not an option)."""
    m = torch.zeros(len(options), len(options) + 1, dtype=torch.long)
    for t, s in zip(truth, said):
        m[options.index(t), options.index(s) if s in options else len(options)] += 1
    return m


# ------------------------------------------------------------------------------ looking inside
@torch.no_grad()
def object_attention(model, data: ShapesData, question: str, layers: list[int] | None = None) -> torch.Tensor:
    """[layers, heads]: of the attention the question's last token (the one that predicts the
    answer) puts on image tokens, the mean fraction that lands on the token whose 28 x 28 px
    cell holds the shape's centre. Spreading evenly over the 3 x 3 tokens gives 1/9."""
    from .attention_maps import record_attention

    _check_model(model)
    _check_data(data)
    check_choice("question", question, QUESTIONS)
    ids = torch.tensor([prompt_ids(question, model.config.vision)] * len(data))
    maps = record_attention(model, ids, pixel_values=data.pixels, layers=layers)
    cell = torch.tensor([POSITIONS.index(sc.position(data.cfg)) for sc in data.scenes])  # [n]
    out = []
    for layer in maps.layers:
        w = maps.probs[layer][:, :, -1][:, :, maps.is_image[0]]  # [n, h, image tokens]
        w = w / w.sum(-1, keepdim=True)
        out.append(w[torch.arange(len(data)), :, cell].mean(0))  # [h]
    return torch.stack(out)


def modality_loads(trace) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) expert loads [moe layers, e] of a RouterTrace: token copies per expert from
    image-patch tokens and from all other tokens."""
    img = trace.is_image()
    return (torch.stack([trace.load(i, img) for i in trace.moe_layers]),
            torch.stack([trace.load(i, ~img) for i in trace.moe_layers]))


def routing_separation(trace) -> torch.Tensor:
    """[moe layers]: total-variation distance between the expert distributions of image tokens
    and of text tokens, 0.5 * sum_e |p_image(e) - p_text(e)|: 0 = routed alike, 1 = disjoint experts."""
    image_load, text_load = (a.float() for a in modality_loads(trace))
    p = image_load / image_load.sum(-1, keepdim=True).clamp(min=1)
    q = text_load / text_load.sum(-1, keepdim=True).clamp(min=1)
    return 0.5 * (p - q).abs().sum(-1)


# ------------------------------------------------------------------------------ cached checkpoint
def train_and_save(path, cfg: ShapesTrainConfig | None = None, shapes_cfg: ShapesConfig = ShapesConfig(),
                   model_seed: int = 0):
    """Train `configs.tiny_multimodal()` from Llama4.random(seed=model_seed) with train_shapes and
    write it to `path` (a Hugging Face directory: config.json + model.safetensors) together with
    history.json (the per-step loss and learning rate, the configs, the wall time). Returns
    (model, history dict). Notebook 04 loads the result with `load_trained`."""
    import json
    from pathlib import Path

    from .configs import tiny_multimodal
    from .model import Llama4

    cfg = cfg or ShapesTrainConfig()
    model = Llama4.random(tiny_multimodal(), seed=model_seed)
    history = train_shapes(model, cfg, shapes_cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    record = {**history.to_dict(), "train_config": dataclasses.asdict(cfg),
              "shapes_config": dataclasses.asdict(shapes_cfg), "model_seed": model_seed,
              "torch_threads": torch.get_num_threads()}
    (path / "history.json").write_text(json.dumps(record, indent=1))
    return model, record


def load_trained(path):
    """(model, history dict) written by `train_and_save`."""
    import json
    from pathlib import Path

    from .checkpoint import from_pretrained

    path = Path(path)
    return from_pretrained(path, dtype="fp32"), json.loads((path / "history.json").read_text())
