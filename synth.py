"""The synthetic remote-sensing world: the embedded default's data and its tiny model.

A scene is drawn as facts first (class, land-cover layout, objects with kind, colour and pixel box) and rendered
second. Captions, questions, reasoning and ground truth are all written from the same facts, so text and pixels
cannot disagree. Its own file because it is a world generator, not data plumbing.

    python synth.py synth --out DIR --seed 0    # every stage's split (pretrain, SFT, CoT, GRPO, evaluation)
    python synth.py tiny --out DIR --seed 0     # a tiny random Qwen2-VL whose tokenizer is trained on this world's text

A tiny checkpoint carries what only tiny checkpoints need: a byte-level BPE tokenizer trained here with Qwen2's
pre-tokenizer and special tokens, and Qwen2-VL-Instruct's Jinja chat template, written as a data file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from data import DEFAULT_SYSTEM, REASONING_SYSTEM_PROMPT, TASK_PROMPTS, ImageProcessor, tokenizer_config

SCENE_CLASSES = ("airport", "desert", "farmland", "forest", "harbor", "industrial", "parking lot", "residential")
URBAN = frozenset({"airport", "harbor", "industrial", "parking lot", "residential"})
OBJECT_KINDS = ("building", "ship", "plane", "tank", "vehicle")
COLOURS = {"white": (235, 235, 228), "grey": (128, 128, 134), "red": (192, 44, 38), "blue": (42, 82, 196),
           "yellow": (228, 196, 48), "black": (28, 28, 32)}
# Objects other than vehicles fill whole cells of a 4x4 grid (CELL px: 2x2 image tokens, as 14-px patches merge
# 2x2), so a box is one of few and ends where tokens end. Boxes drawn anywhere (9-44 px) or on the 28-px token grid
# (8x8 positions, several sizes) stayed near chance for the tiny model; on this grid, one object per image,
# grounding alone goes from chance to 91.5% Pr@0.5 between steps 600 and 900 (batch 16). Vehicles stay small and
# free: counted, never grounded.
CELL = 56
# kind: (colours, long side (in cells; vehicles in px), short/long side ratio)
KINDS = {"building": (("red", "grey", "white", "blue"), (1, 1), (1, 1)),
         "ship": (("white", "grey", "red"), (2, 2), (0.5, 0.5)), "plane": (("white", "grey"), (1, 1), (1, 1)),
         "tank": (("white", "grey"), (1, 1), (1, 1)), "vehicle": (tuple(COLOURS), (9, 14), (0.45, 0.55))}
# Per scene class, per object kind: (min, max) count. Few kinds per class, so objects are clues to the class.
SCENE_OBJECTS = {
    "airport": {"plane": (1, 4), "vehicle": (0, 3)}, "desert": {"vehicle": (0, 2)},
    "farmland": {"building": (0, 2), "vehicle": (0, 1)}, "forest": {"building": (0, 1)},
    "harbor": {"ship": (2, 6), "tank": (0, 3)},
    "industrial": {"tank": (3, 7), "building": (1, 3), "vehicle": (0, 2)},
    "parking lot": {"vehicle": (8, 18), "building": (0, 1)}, "residential": {"building": (5, 10), "vehicle": (0, 4)},
}
# Land cover as a noun phrase; {land}, {dir}, {n} come from the scene layout.
_COVER = {"airport": "grass around a {dir} runway", "desert": "sand dunes over the whole area",
          "farmland": "crop fields in {n} plots", "forest": "dense trees over the whole area",
          "harbor": "water over most of the area and land along the {land} edge", "industrial": "bare concrete ground",
          "parking lot": "asphalt with painted parking lines", "residential": "houses along a grid of streets"}
# (w, h): a multiple of 28 within 28*28*64 pixels, so a tiny model's processor sees it whole, unresized; one size,
# so a box's 0-1000 coordinates are multiples of 250 (1000 / 4 cells).
SYNTH_SIZES = ((224, 224),)
# Each split draws from its own seed (seed*1000 + index): no scene is shared between splits.
SYNTH_SPLITS = {"pretrain": 0, "sft": 1, "grpo": 2, "cls_synth": 3, "vqa_synth": 4, "vg_synth": 5, "mcq_synth": 6,
                "pretrain_vg": 7, "example": 8, "corpus": 9, "sft_vg": 10, "grpo_vg": 11}
# Unbalanced on purpose (VHM-Instruct is): --balance in SFT has something to fix. GRPO leans on grounding.
SFT_TASKS = {"cls": 0.25, "presence": 0.15, "count": 0.12, "vg": 0.25, "comparison": 0.07, "mcq": 0.08,
             "rural_urban": 0.08}
GRPO_TASKS = {"vg": 0.35, "cls": 0.15, "presence": 0.15, "count": 0.12, "comparison": 0.05, "mcq": 0.07,
              "rural_urban": 0.05, "caption": 0.06}
# Evaluation file: (its task type for evaluate.py, the tasks it asks)
EVAL_TASKS = {"cls_synth": ("cls", ("cls",)), "vqa_synth": ("vqa", ("presence", "count", "comparison", "rural_urban")),
              "vg_synth": ("bbox", ("vg",)), "mcq_synth": ("mcq", ("mcq",))}


@dataclass
class SynthObject:
    kind: str
    colour: str
    box: tuple  # (x1, y1, x2, y2) pixel edges: x2, y2 exclusive
    vertical: bool


@dataclass
class SynthScene:
    cls: str
    w: int
    h: int
    layout: dict  # background parameters: harbour land side, runway direction, field plots
    objects: list
    tex_seed: int  # pixel-level randomness, drawn with the facts so text-only callers see the same facts


def _plural(kind, n=2):
    return kind if n == 1 else kind + "s"


def _join(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _land_and_water(w, h, side, frac):
    """(water rect, land rect) of a harbour whose land strip lies along `side`."""
    cut = {"left": round(w * (1 - frac)), "right": round(w * frac), "top": round(h * (1 - frac)),
           "bottom": round(h * frac)}[side]
    a, b = ((0, 0, cut, h), (cut, 0, w, h)) if side in ("left", "right") else ((0, 0, w, cut), (0, cut, w, h))
    return (b, a) if side in ("left", "top") else (a, b)


def _place(rng, kind, region, taken):
    """An object of `kind` inside `region` and clear of `taken` (grid objects may share a cell edge; 3 px from a
    vehicle); None when 30 tries find no room."""
    colours, (lo, hi), aspect = KINDS[kind]
    grid = kind != "vehicle"
    long = int(rng.integers(lo, hi + 1))
    short = max(1 if grid else 4, round(long * rng.uniform(*aspect)))
    vertical = bool(rng.integers(2))
    bw, bh = (short, long) if vertical else (long, short)
    colour = colours[int(rng.integers(len(colours)))]
    x0, y0, x1, y1 = region
    step, pad = (CELL, 0) if grid else (1, 3)  # positions: whole cells inside the region, or pixels 3 px inside
    bw, bh = bw * step, bh * step
    xs = range(-(-(x0 + pad) // step) * step, x1 - pad - bw + 1, step)
    ys = range(-(-(y0 + pad) // step) * step, y1 - pad - bh + 1, step)
    if not xs or not ys:
        return None
    for _ in range(30):
        x, y = xs[int(rng.integers(len(xs)))], ys[int(rng.integers(len(ys)))]
        if all(x + bw + m <= o.box[0] or o.box[2] + m <= x or y + bh + m <= o.box[1] or o.box[3] + m <= y
               for o in taken for m in [0 if grid and o.kind != "vehicle" else 3]):
            return SynthObject(kind, colour, (x, y, x + bw, y + bh), vertical)
    return None


def sample_scene(rng, cls=None) -> SynthScene:
    """Scene facts: class (random unless given), image size, layout, objects placed without overlap."""
    cls = cls or SCENE_CLASSES[int(rng.integers(len(SCENE_CLASSES)))]
    w, h = SYNTH_SIZES[int(rng.integers(len(SYNTH_SIZES)))]
    layout, regions = {}, {}
    if cls == "harbor":
        layout = {"land": ("left", "right", "top", "bottom")[int(rng.integers(4))], "frac": rng.uniform(0.6, 0.75)}
        regions["ship"], regions["tank"] = _land_and_water(w, h, layout["land"], layout["frac"])
    elif cls == "airport":
        layout = {"dir": ("horizontal", "vertical")[int(rng.integers(2))], "pos": rng.uniform(0.3, 0.7)}
    elif cls == "farmland":
        layout = {"cols": int(rng.integers(2, 4)), "rows": int(rng.integers(1, 3))}
        layout["n"] = layout["cols"] * layout["rows"]
    objects = []
    for kind, (lo, hi) in SCENE_OBJECTS[cls].items():
        for _ in range(int(rng.integers(lo, hi + 1))):
            if (o := _place(rng, kind, regions.get(kind, (0, 0, w, h)), objects)) is not None:
                objects.append(o)
    return SynthScene(cls, w, h, layout, objects, int(rng.integers(2 ** 31)))


# -- pixels ---------------------------------------------------------------------------------------------------
_GROUND = {"water": (34, 74, 112), "grass": (104, 140, 70), "sand": (206, 176, 126), "concrete": (162, 158, 150),
           "asphalt": (74, 74, 80), "trees": (40, 84, 44), "town": (176, 170, 160)}
_CROPS = ((112, 152, 62), (192, 172, 92), (132, 102, 62), (84, 132, 52))
# Outlines in a unit box (u along the object's long axis, nose at u=1; v across): (points, darker shade?)
_SHAPES = {
    "ship": [(((0, 0), (.78, 0), (1, .5), (.78, 1), (0, 1)), False),  # hull with a pointed bow, cabin
             (((.1, .25), (.35, .25), (.35, .75), (.1, .75)), True)],
    "plane": [(((0, .42), (1, .42), (1, .58), (0, .58)), False),  # fuselage, swept wings, tailplane
              (((.4, 0), (.5, 0), (.7, .42), (.7, .58), (.5, 1), (.4, 1), (.5, .58), (.5, .42)), False),
              (((0, .3), (.1, .3), (.1, .7), (0, .7)), False)],
    "vehicle": [(((0, 0), (1, 0), (1, 1), (0, 1)), False), (((.62, .1), (.78, .1), (.78, .9), (.62, .9)), True)],
}


def _texture(rng, h, w, ground, amp=24.0, cell=16, grain=0.0):
    """Ground colour with smooth value noise (a coarse random grid upsampled) and optional per-pixel grain."""
    from PIL import Image
    g = rng.random((h // cell + 2, w // cell + 2), dtype=np.float32)
    smooth = np.asarray(Image.fromarray(g, "F").resize((w, h), Image.Resampling.BILINEAR)) - 0.5
    noise = amp * smooth + (rng.normal(0, grain, (h, w)) if grain else 0)
    return np.asarray(_GROUND.get(ground, ground), np.float32) + noise[..., None]


def _background(s: SynthScene, rng):
    h, w, L = s.h, s.w, s.layout
    if s.cls == "harbor":
        img = _texture(rng, h, w, "water", 16, 24, 3)
        x0, y0, x1, y1 = _land_and_water(w, h, L["land"], L["frac"])[1]
        img[y0:y1, x0:x1] = _texture(rng, y1 - y0, x1 - x0, "concrete")
    elif s.cls == "forest":
        img = _texture(rng, h, w, "trees", 20) + _texture(rng, h, w, (0, 0, 0), 90, 3)  # tree crowns
    elif s.cls == "desert":
        yy, xx = np.mgrid[0:h, 0:w]
        a = rng.uniform(0, np.pi)
        img = _texture(rng, h, w, "sand", 18, 32, 3) + 14 * np.sin((xx * np.cos(a) + yy * np.sin(a)) / 5)[..., None]
    elif s.cls == "farmland":
        img = np.zeros((h, w, 3), np.float32)
        xs, ys = np.linspace(0, w, L["cols"] + 1).astype(int), np.linspace(0, h, L["rows"] + 1).astype(int)
        for i in range(L["cols"]):
            for j in range(L["rows"]):
                tex = _texture(rng, ys[j + 1] - ys[j], xs[i + 1] - xs[i], _CROPS[int(rng.integers(len(_CROPS)))], 16)
                if rng.random() < 0.5:  # crop rows, one direction per field
                    tex[::5] *= 0.85
                else:
                    tex[:, ::5] *= 0.85
                tex[[0, -1]], tex[:, [0, -1]] = 70, 70  # field boundaries
                img[ys[j]:ys[j + 1], xs[i]:xs[i + 1]] = tex
    elif s.cls == "airport":
        img = _texture(rng, h, w, "grass")
        c = int((h if L["dir"] == "horizontal" else w) * L["pos"])
        view = img if L["dir"] == "horizontal" else img.transpose(1, 0, 2)  # a vertical runway: draw transposed
        view[c - 13:c + 13] = _texture(rng, 26, view.shape[1], "asphalt", 10)
        view[c - 1:c + 1, (np.arange(view.shape[1]) % 16) < 8] = 230  # centre-line dashes
    elif s.cls == "parking lot":
        img = _texture(rng, h, w, "asphalt", 12)
        img[(np.arange(h) % 28) < 18, ::14] = 215  # bay lines
    elif s.cls == "residential":
        img = _texture(rng, h, w, "town", 20)
        img[(np.arange(h) % 56) < 8], img[:, (np.arange(w) % 56) < 8] = 90, 90  # street grid
    else:
        img = _texture(rng, h, w, "concrete", 22)
    return img


def render_scene(s: SynthScene):
    """The scene as an RGB PIL image (deterministic given the scene)."""
    from PIL import Image, ImageDraw
    im = Image.fromarray(np.clip(_background(s, np.random.default_rng(s.tex_seed)), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for o in s.objects:
        x1, y1, x2, y2 = o.box[0], o.box[1], o.box[2] - 1, o.box[3] - 1  # PIL shapes include their end pixel
        c = COLOURS[o.colour]
        dark = tuple(v * 3 // 5 for v in c)
        if o.kind == "building":  # a shadow gives height, a ridge line a roof
            d.rectangle((x1 + 3, y1 + 3, x2 + 3, y2 + 3), fill=(38, 38, 40))
            d.rectangle((x1, y1, x2, y2), fill=c, outline=dark)
            mx, my = (x1 + x2) // 2, (y1 + y2) // 2
            d.line((mx, y1, mx, y2) if o.vertical else (x1, my, x2, my), fill=dark)
        elif o.kind == "tank":
            d.ellipse((x1 + 2, y1 + 2, x2 + 2, y2 + 2), fill=(38, 38, 40))
            d.ellipse((x1, y1, x2, y2), fill=c, outline=dark, width=2)
            k = (x2 - x1) // 4
            d.ellipse((x1 + k, y1 + k, x2 - k, y2 - k), outline=dark)
        else:
            for pts, shade in _SHAPES[o.kind]:
                d.polygon([(x1 + v * (x2 - x1), y1 + u * (y2 - y1)) if o.vertical else
                           (x1 + u * (x2 - x1), y1 + v * (y2 - y1)) for u, v in pts], fill=dark if shade else c)
    return im


# -- text -------------------------------------------------------------------------------------------------------
def _where(s: SynthScene, box) -> str:
    col = ("left", "", "right")[min(2, int(3 * (box[0] + box[2]) / 2 / s.w))]
    row = ("top", "", "bottom")[min(2, int(3 * (box[1] + box[3]) / 2 / s.h))]
    return f"{row} {col}".strip() or "center"


def norm_box(s: SynthScene, box) -> list:
    """Pixel box -> VHM/Qwen 0..1000 integers."""
    return [round(v * 1000 / (s.w, s.h)[i % 2]) for i, v in enumerate(box)]


def _counts(s: SynthScene) -> dict:
    return {k: sum(o.kind == k for o in s.objects) for k in OBJECT_KINDS}


def _cover(s: SynthScene) -> str:
    return _COVER[s.cls].format(**s.layout)


def _count_phrase(s: SynthScene) -> str:
    c = _counts(s)
    return _join([f"{c[k]} {_plural(k, c[k])}" for k in OBJECT_KINDS if c[k]]) if s.objects else ""


def _kind_phrase(s: SynthScene, kind) -> str:
    objs = [o for o in s.objects if o.kind == kind]
    if len(objs) > 4:
        return f"{len(objs)} {_plural(kind)} spread over the image"
    if len(objs) == 1:
        return f"1 {objs[0].colour} {kind} at the {_where(s, objs[0].box)}"
    return f"{len(objs)} {_plural(kind)} (" + ", ".join(f"{o.colour} at the {_where(s, o.box)}" for o in objs) + ")"


def _box_text(s: SynthScene, box) -> str:
    """A pixel box as a grounding answer writes it: [[x1, y1, x2, y2]] in 0..1000."""
    return "[[{}, {}, {}, {}]]".format(*norm_box(s, box))


def scene_caption(s: SynthScene) -> str:
    """A caption: scene class, land cover, then every object but vehicles with its colour and where it lies
    (vehicles, a few pixels each, only counted). Positions in words, not boxes: P's boxes come from its grounding
    records (single_object_scene), each at the distance from the image that S's grounding answers use; boxes
    inside captions sit at distances that vary with the text before them, and made P's steps half digits."""
    parts = []
    for k in OBJECT_KINDS:
        objs = [o for o in s.objects if o.kind == k]
        if not objs:
            continue
        if k == "vehicle":
            parts.append(f"{len(objs)} {_plural(k, len(objs))}")
        elif len(objs) == 1:
            parts.append(f"1 {objs[0].colour} {k} at the {_where(s, objs[0].box)}")
        else:
            parts.append(f"{len(objs)} {_plural(k)} (" + ", ".join(f"{o.colour} at the {_where(s, o.box)}"
                                                                   for o in objs) + ")")
    objs = ("The image contains " + _join(parts) + "." if parts
            else "There are no buildings, ships, planes, tanks or vehicles.")
    return f"An aerial view of {_article(s.cls)} {s.cls} scene. It shows {_cover(s)}. {objs}"


# One-object grounding questions, each split its own scenes: P's records (pretrain.json), S's and C's (kept in
# sft.json and cot.json, so S and C do not wear down what P taught), R's prompts (grpo.jsonl).
ONE_OBJECT_SPLITS = ("pretrain_vg", "sft_vg", "grpo_vg")


def single_object_scene(rng) -> SynthScene:
    """A scene with one grid object (and its vehicles), for ONE_OBJECT_SPLITS. With one candidate, a grounding
    answer depends only on where the object is, so P can learn to read positions before S asks it to pick
    one object among several; learnt from scratch among distractors, neither skill gets a signal until the
    other has one (grounding only, 300 steps: 5% Pr@0.5 on the evaluation split; one object per image: 25.5%)."""
    while True:
        s = sample_scene(rng)
        grid = [o for o in s.objects if o.kind != "vehicle"]
        if grid:
            s.objects = [grid[int(rng.integers(len(grid)))]] + [o for o in s.objects if o.kind == "vehicle"]
            return s


def _referable(s: SynthScene) -> list:
    """(phrase, object) for the grid objects "<colour> <kind>" picks out (the only one of that kind in that colour).
    Always both words, even where the kind alone would do: every grounding question is then the same number of
    tokens, so a box's first coordinate is always written the same distance after the image. The tiny model
    reads position through M-RoPE, relative to the token it writes; with phrases of 1 to 3 tokens that distance
    moved by up to 2 tokens, as much as half a grid cell in the rotary angles, and grounding stayed at chance
    (one object per image, 300 steps: 10% Pr@0.5 with varying questions, 25.5% with one fixed question)."""
    out = []
    for o in s.objects:
        if o.kind == "vehicle":  # a few pixels: countable, too small to ground at this resolution
            continue
        if sum(p.kind == o.kind and p.colour == o.colour for p in s.objects) == 1:
            out.append((f"{o.colour} {o.kind}", o))
    return out


def _options(rng, right, pool):
    """Four shuffled options, `right` among them: (lines "A. x", letter of `right`)."""
    others = [p for p in pool if p != right]
    opts = [right] + [others[i] for i in rng.choice(len(others), 3, replace=False)]
    opts = [opts[i] for i in rng.permutation(4)]
    return "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(opts)), "ABCD"[opts.index(right)]


def synth_task(rng, s: SynthScene, task: str) -> dict | None:
    """One question about the scene: {task, type (cls/vqa/bbox/mcq/open), q (bare question, as evaluation files
    store it), question (training prompt), answer, reasoning, answer_type (GRPO), mcq_type?, box_px?};
    None when the scene cannot pose it (grounding needs an object a short phrase picks out)."""
    c = _counts(s)
    present, absent = [k for k in OBJECT_KINDS if c[k]], [k for k in OBJECT_KINDS if not c[k]]
    seen = f"The image shows {_cover(s)}" + (f", with {_count_phrase(s)}" if s.objects else "")
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    t = {"task": task, "type": "vqa"}
    if task == "cls":
        t.update(type="cls", q="Classify the scene into one of: " + ", ".join(SCENE_CLASSES) + ".", answer=s.cls,
                 reasoning=f"{seen}, so this is {_article(s.cls)} {s.cls} scene.")
    elif task == "presence":
        kind = pick(present if present and (rng.random() < 0.5 or not absent) else absent)
        t.update(q=f"Is there {_article(kind)} {kind} in this image?", answer="yes" if c[kind] else "no",
                 reasoning=f"I look for {_plural(kind)} and find {_kind_phrase(s, kind)}." if c[kind]
                 else f"I look for {_plural(kind)} and find none. {seen}.")
    elif task == "count":
        kind = pick(present) if present and rng.random() < 0.8 else pick(OBJECT_KINDS)
        t.update(q=f"How many {_plural(kind)} are in this image?", answer=str(c[kind]),
                 reasoning=f"I count the {_plural(kind)}: {_kind_phrase(s, kind)}. That makes {c[kind]}." if c[kind]
                 else f"I find no {_plural(kind)} in the image, so the count is 0.")
    elif task == "comparison":
        pool = present + [k for k in SCENE_OBJECTS[s.cls] if k not in present]
        pool = pool if len(pool) >= 2 else pool + [pick([k for k in OBJECT_KINDS if k not in pool])]
        a, b = (pool[i] for i in rng.choice(len(pool), 2, replace=False))
        t.update(q=f"Are there more {_plural(a)} than {_plural(b)} in this image?",
                 answer="yes" if c[a] > c[b] else "no",
                 reasoning=f"There are {c[a]} {_plural(a, c[a])} and {c[b]} {_plural(b, c[b])}; {c[a]} is "
                           f"{'more' if c[a] > c[b] else 'not more'} than {c[b]}.")
    elif task == "rural_urban":
        area = "urban" if s.cls in URBAN else "rural"
        t.update(q="Is this a rural or an urban area?", answer=area,
                 reasoning=f"{seen}. This {s.cls} scene is typical of {_article(area)} {area} area.")
    elif task == "vg":
        if not (refs := _referable(s)):
            return None
        phrase, o = pick(refs)
        b, box = norm_box(s, o.box), _box_text(s, o.box)
        # The reasoning opens with the box: a reasoned answer then writes its first coordinate one token later than a
        # plain answer does (after "<reasoning"), as close as it can come to where P and S learnt to write boxes.
        t.update(type="bbox", q=f"Locate the {phrase} in this image.", answer=box,
                 box_px=list(o.box), reasoning=f"{box} holds the {phrase}: at the {_where(s, o.box)} "
                 f"of the image, x from {b[0]} to {b[2]} and y from {b[1]} to {b[3]} in 0-1000 coordinates.")
    elif task == "mcq":
        single, top = [k for k in present if c[k] == 1], [k for k in present if c[k] == max(c.values())]
        kinds = ["scene"] + ["counting"] * bool(present) + ["color"] * bool(single) + \
            ["position"] * bool(_referable(s)) + ["most common"] * (len(top) == 1 and len(present) > 1)
        t["mcq_type"] = kind = pick(kinds)
        if kind == "scene":
            q, right, pool, fact = "What kind of scene is shown in this image?", s.cls, SCENE_CLASSES, seen
        elif kind == "counting":
            k = pick(present)
            q, right, fact = f"How many {_plural(k)} are in this image?", str(c[k]), f"I count {_kind_phrase(s, k)}"
            pool = [str(n) for n in range(max(0, c[k] - 3), c[k] + 5)]
        elif kind == "color":
            k = pick(single)
            o = next(o for o in s.objects if o.kind == k)
            q, right, pool = f"What colour is the {k}?", o.colour, tuple(COLOURS)
            fact = f"The {k} at the {_where(s, o.box)} is {o.colour}"
        elif kind == "position":
            phrase, o = pick(_referable(s))
            q, right = f"Where is the {phrase} in this image?", _where(s, o.box)
            pool = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
            fact = f"The {phrase} is at the {right} of the image"
        else:
            q, right, pool = "Which kind of object is the most common in this image?", top[0], OBJECT_KINDS
            fact = f"The image contains {_count_phrase(s)}, so {_plural(top[0])} are the most common"
        opts, letter = _options(rng, right, pool)
        t.update(type="mcq", q=f"{q}\n{opts}", answer=letter, reasoning=f"{fact}, which is option {letter}.")
    elif task == "caption":
        with_objects = f" with {_count_phrase(s)}" if s.objects else ""
        t.update(type="open", q="Describe the image in one sentence.", reasoning=f"{seen}.",
                 answer=f"An aerial view of {_article(s.cls)} {s.cls} scene{with_objects}.")
    else:
        raise ValueError(f"unknown synthetic task {task!r}")
    t["question"] = TASK_PROMPTS[t["type"]].replace("{q}", t["q"])
    t["answer_type"] = {"bbox": "box", "open": "open"}.get(t["type"], "closed")
    return t


def cot_answer(t: dict) -> str:
    return f"<reasoning>{t['reasoning']}</reasoning><answer>{t['answer']}</answer>"


def _draw_tasks(rng, s, weights: dict, k: int) -> list:
    """Up to k distinct feasible tasks, drawn by weight without replacement."""
    names = list(weights)
    p = np.asarray([weights[n] for n in names]) / sum(weights.values())
    out = []
    for i in rng.choice(len(names), len(names), replace=False, p=p):
        if len(out) < k and (t := synth_task(rng, s, names[i])) is not None:
            out.append(t)
    return out


def _split_rng(seed: int, split: str):
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(seed * 1000 + SYNTH_SPLITS[split])


def split_items(seed: int, split: str, n: int, per_image: int = 1):
    """(scene, tasks) for the n images of a split, in file order: the one source of the files and of the facts
    tests check them against. pretrain has no tasks; the *_vg splits one grounding question on a one-object scene
    (ONE_OBJECT_SPLITS); an evaluation file draws among its own tasks, redrawing scenes that can pose none."""
    rng = _split_rng(seed, split)
    single = split in ONE_OBJECT_SPLITS
    weights = {"sft": SFT_TASKS, "grpo": GRPO_TASKS, "pretrain": {}}.get(split, {"vg": 1.0} if single else None)
    weights = {t: 1.0 for t in EVAL_TASKS[split][1]} if weights is None else weights
    while n > 0:
        s = single_object_scene(rng) if single else sample_scene(rng)
        tasks = _draw_tasks(rng, s, weights, per_image) if weights else []
        if weights and not tasks:
            continue
        n -= 1
        yield s, tasks


def synth_texts(seed: int = 0, n_scenes: int = 600) -> list:
    """Every kind of text the synthetic world produces (no pixels drawn): the tokenizer's training corpus."""
    rng = _split_rng(seed, "corpus")
    texts = [DEFAULT_SYSTEM, REASONING_SYSTEM_PROMPT, "Describe the image.", "system\n", "user\n", "assistant\n"]
    for _ in range(n_scenes):
        s = sample_scene(rng)
        texts.append(scene_caption(s))
        for task in GRPO_TASKS:
            if (t := synth_task(rng, s, task)) is not None:
                texts += [t["question"], t["answer"], cot_answer(t)]
    return texts


def _dump(path, obj, lines=False):
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in obj)
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1)


def _render_to(job):
    s, path = job
    render_scene(s).save(path, format="PNG", compress_level=1)  # fast; PNG carries no timestamp: same bytes


def _render_all(jobs):
    """Draw and save every (scene, path), in one process per core: the scene alone fixes the pixels, so the bytes
    do not depend on the number of processes."""
    for d in sorted({os.path.dirname(p) for _, p in jobs}):
        os.makedirs(d, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < 2 or len(jobs) < 256:  # a few hundred images take less than starting the pool
        for job in jobs:
            _render_to(job)
        return
    with ProcessPoolExecutor(min(cores, 8)) as ex:
        list(ex.map(_render_to, jobs, chunksize=64))


def _human_gpt(q, a):
    return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]


def write_synth(out: str, seed: int = 0, n_pretrain: int = 1000, n_sft: int = 1000, questions_per_image: int = 2,
                n_grpo: int = 300, n_eval: int = 100, n_pretrain_vg: int = 0, n_sft_vg: int = 0,
                n_grpo_vg: int = 0) -> dict:
    """All splits under `out`: pretrain.json (n_pretrain captions, then n_pretrain_vg grounding questions on
    one-object scenes), sft.json (questions on n_sft images, then n_sft_vg one-object grounding questions), cot.json
    (sft.json's ids and questions, reasoned answers), grpo.jsonl (n_grpo prompts, then n_grpo_vg one-object ones),
    meta.json, images/<split>/*.png (record paths are relative to `out`), and eval/<file>.json with
    images in eval/<file>/ (RSRM layout: bare questions, grounding truth in pixels). Returns record counts."""
    for sub in ("images", "eval"):  # a rerun with other sizes must not leave stale images behind
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)

    jobs = []  # (scene, path): drawn after the records, on every core (drawing and PNG encoding are the time)

    def save(s, rel):
        jobs.append((s, os.path.join(out, rel)))

    pre, sft, cot, grpo = [], [], [], []
    for i, (s, _) in enumerate(split_items(seed, "pretrain", n_pretrain)):
        save(s, img := f"images/pretrain/{i:05d}.png")
        pre.append({"id": f"pretrain_{i:05d}", "image": img,
                    "conversations": _human_gpt("Describe the image.", scene_caption(s))})
    for i, (s, (t,)) in enumerate(split_items(seed, "pretrain_vg", n_pretrain_vg)):
        save(s, img := f"images/pretrain_vg/{i:05d}.png")
        pre.append({"id": f"pretrain_vg_{i:05d}", "image": img, "task": "vg",
                    "conversations": _human_gpt(t["question"], t["answer"])})
    for i, (s, tasks) in enumerate(split_items(seed, "sft", n_sft, questions_per_image)):
        save(s, img := f"images/sft/{i:05d}.png")
        for j, t in enumerate(tasks):
            rec = {"id": f"sft_{i:05d}_{j}", "image": img, "task": t["task"]}
            sft.append({**rec, "conversations": _human_gpt(t["question"], t["answer"])})
            cot.append({**rec, "conversations": _human_gpt(t["question"], cot_answer(t))})
    for i, (s, (t,)) in enumerate(split_items(seed, "sft_vg", n_sft_vg)):
        save(s, img := f"images/sft_vg/{i:05d}.png")
        rec = {"id": f"sft_vg_{i:05d}", "image": img, "task": "vg"}
        sft.append({**rec, "conversations": _human_gpt(t["question"], t["answer"])})
        cot.append({**rec, "conversations": _human_gpt(t["question"], cot_answer(t))})
    for split, n in (("grpo", n_grpo), ("grpo_vg", n_grpo_vg)):
        for i, (s, (t,)) in enumerate(split_items(seed, split, n)):
            save(s, img := f"images/{split}/{i:05d}.png")
            grpo.append({"id": f"{split}_{i:05d}", "image": img, "question": t["question"], "answer": t["answer"],
                         "answer_type": t["answer_type"], "task": t["task"]})
    for name, recs in (("pretrain.json", pre), ("sft.json", sft), ("cot.json", cot)):
        _dump(os.path.join(out, name), recs)
    _dump(os.path.join(out, "grpo.jsonl"), grpo, lines=True)
    counts = {"pretrain": len(pre) - n_pretrain_vg, "pretrain_vg": n_pretrain_vg, "sft": len(sft) - n_sft_vg,
              "sft_vg": n_sft_vg, "cot": len(cot), "grpo": len(grpo) - n_grpo_vg, "grpo_vg": n_grpo_vg}
    for name in EVAL_TASKS:
        recs = []
        for i, (s, (t,)) in enumerate(split_items(seed, name, n_eval)):
            save(s, f"eval/{name}/{i:05d}.png")
            a = "[[{}, {}, {}, {}]]".format(*t["box_px"]) if t["type"] == "bbox" else t["answer"]
            recs.append({"image": f"{i:05d}.png", "conversations": _human_gpt(t["q"], a), "size": [s.w, s.h],
                         "type": [t.get("mcq_type", t["task"])]})
        _dump(os.path.join(out, "eval", name + ".json"), recs)
        counts[name] = len(recs)
    _render_all(jobs)
    _dump(os.path.join(out, "meta.json"), {"seed": seed, "classes": list(SCENE_CLASSES), "records": counts,
                                           "eval_task_types": {n: v[0] for n, v in EVAL_TASKS.items()},
                                           "sft_tasks": {k: sum(r["task"] == k for r in sft) for k in SFT_TASKS}})
    return counts


# -- tiny model ---------------------------------------------------------------------------------------------------
# Qwen2-VL's special tokens in their checkpoint order: a tokenizer we train ourselves appends them in this
# order after its learned vocabulary, so the real checkpoint and our tiny ones differ only by an offset.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, newlines, spaces.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts, vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer and special tokens, trained on `texts`.

    Deterministic for the same texts. The special tokens get the ids right after the learned vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(texts), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


# Qwen2-VL-Instruct's chat template, a data file of the released checkpoint, written into the tiny ones so that
# transformers' tokenizer formats chats as ours does. data.Processor.apply_chat_template is the one implementation
# in code; the tests check the two agree.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(tok, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vision_depth=4, vision_dim=128,
                vision_heads=4, rope_theta=10.0):
    """A few-million-parameter Qwen2-VL with the 2B's shape ratios and the token ids of `tok`.

    rope_theta 10, not the 2B's 1e6: M-RoPE hands the rotary pairs to the t, h and w axes in order of falling
    frequency, so the w (column) pairs get the slowest ones. At 1e6 and this head size one column turns them by
    under 2e-4 rad and the language model cannot tell an image's columns apart (grounding stays at chance); at 10
    a column turns them by 0.1-0.24 rad, a row by 0.26-0.56, and text a few hundred tokens long still has every
    relative position distinct."""
    from model import Qwen2VLConfig, VisionConfig
    half = hidden // heads // 2
    hw = half * 3 // 8  # Qwen's 16/24/24 split of the rotary pairs, scaled to this head size
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2VLConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, mrope_section=[half - 2 * hw, hw, hw], rope_theta=rope_theta,
        max_position_embeddings=4096,
        vocab_size=-(-tok.get_vocab_size() // 64) * 64,  # spare rows, as the real checkpoint has
        tie_word_embeddings=True, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"]], pad_token_id=ids["<|endoftext|>"],
        # mlp_ratio an int: transformers' strict config refuses a float
        vision=VisionConfig(depth=vision_depth, embed_dim=vision_dim, num_heads=vision_heads, mlp_ratio=4,
                            hidden_size=hidden))
    cfg.validate("tiny config")
    return cfg


def write_tiny(out: str, seed: int = 0, vocab_size: int = 1024, max_pixels: int = 28 * 28 * 64, **shape) -> int:
    """A tiny random Qwen2-VL checkpoint in HF layout, tokenizer and processor files included, plus example.png
    (a harbour scene). Returns the parameter count."""
    from checkpoint import save
    from model import Qwen2VL, init_weights
    tok = train_tokenizer(synth_texts(seed), vocab_size)
    model = init_weights(Qwen2VL.empty(tiny_config(tok, **shape)), seed)
    tok_cfg = tokenizer_config(QWEN2VL_CHAT_TEMPLATE)
    files = {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(tok_cfg, indent=2),
             "preprocessor_config.json": json.dumps(ImageProcessor(max_pixels=max_pixels).to_dict(), indent=2)}
    save(model.config, model.state_dict(), out, extra_files=files)
    render_scene(sample_scene(_split_rng(seed, "example"), "harbor")).save(os.path.join(out, "example.png"))
    return sum(p.numel() for p in model.parameters())


def add_synth_args(p):
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    for flag, default, what in (("n-pretrain", 1000, "caption images"), ("n-sft", 1000, "SFT / CoT images"),
                                ("questions-per-image", 2, "SFT / CoT questions per image"),
                                ("n-grpo", 300, "GRPO prompts (one image each)"),
                                ("n-eval", 100, "records per evaluation file"),
                                ("n-pretrain-vg", 0, "one-object grounding questions added to pretrain.json"),
                                ("n-sft-vg", 0, "one-object grounding questions added to sft.json and cot.json"),
                                ("n-grpo-vg", 0, "one-object grounding prompts added to grpo.jsonl")):
        p.add_argument("--" + flag, type=int, default=default, help=f"{what} (default {default})")


def run_synth(a):
    """Write the synthetic remote-sensing splits (pretrain, SFT, CoT, GRPO, evaluation)."""
    t0 = time.perf_counter()
    counts = write_synth(a.out, a.seed, a.n_pretrain, a.n_sft, a.questions_per_image, a.n_grpo, a.n_eval,
                         a.n_pretrain_vg, a.n_sft_vg, a.n_grpo_vg)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f" ({time.perf_counter() - t0:.1f} s)")


def add_tiny_args(p):
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    for flag, default in (("seed", 0), ("vocab-size", 1024), ("hidden", 256), ("layers", 4), ("intermediate", 768),
                          ("vision-depth", 4), ("max-pixels", 28 * 28 * 64)):
        p.add_argument("--" + flag, type=int, default=default, help=f"default {default}")


def run_tiny(a):
    """Write a tiny random Qwen2-VL checkpoint with a tokenizer trained on the synthetic world's text."""
    n = write_tiny(a.out, a.seed, a.vocab_size, a.max_pixels, hidden=a.hidden, layers=a.layers,
                   intermediate=a.intermediate, vision_depth=a.vision_depth)
    print(f"wrote {a.out}: tiny Qwen2-VL, {n / 1e6:.2f}M parameters")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, add_arguments, run in (("synth", add_synth_args, run_synth), ("tiny", add_tiny_args, run_tiny)):
        p = sub.add_parser(name, help=run.__doc__.strip().split("\n")[0], description=run.__doc__.strip())
        add_arguments(p)
        p.set_defaults(_run=run)
    args = ap.parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    main()
