"""Evaluate a Qwen2-VL / TinyRS checkpoint on the paper's benchmarks (Table I), like for like with the public
evaluation (TinyRS's fork of ScoreRS's rs_evaluation.py), with honest metrics beside the published ones.

    python evaluate.py --model CKPT --data-root DIR --tasks all --out runs/eval [--mode plain|think|qwen]
    torchrun --nproc_per_node=N evaluate.py ...             # records split over ranks; same results as one
    python evaluate.py --endpoint http://127.0.0.1:8000/v1 --served-model NAME --data-root DIR --tasks all \
        --out runs/eval_served [--concurrency 8]             # any OpenAI-compatible server instead of --model
    python evaluate.py score --task-type vqa preds.jsonl     # score any system's predictions, print JSON
    python evaluate.py compare runs/a runs/b                 # several runs side by side, like Table I

Prompts (--prompts public, the default): the user text the public script sends a TinyRS model, after the
image: "{CLS} q" (classification), "{VQA} q " (VQA), "{VG} q " (grounding), the bare q (LHRS-Bench), q being
the file's first human turn without its <image> placeholder; think mode adds the R1 system prompt
(data.REASONING_SYSTEM_PROMPT), as the public R1 run did. --prompts ours wraps q in data.TASK_PROMPTS, the
wording of our own SFT/GRPO data. --mode qwen uses the base model's wording (QWEN below) either way.

Benchmark files follow the RSRM/ScoreRS layout (a JSON list of {"image", "image_path"?, "conversations": [human,
gpt], "size"?, "type"?}; images in the folder named after the file). Each task writes OUT/<task>.jsonl as it goes
(a header line with the run's settings, then one line per record: the exact prompt text in "prompt", raw
output in "pred", parsed prediction, score, time) and resumes from it; OUT/metrics.json and OUT/results.md
summarise. Text accuracy is reported twice: strict (normalised exact match; empty is wrong) and lenient, the
public rule behind published numbers (spaces removed, lower case, `prediction in answer`: an empty prediction
counts as correct). Grounding Pr@0.5 too: strict (a prediction without a box is a miss) and public
(`pr@0.5_public`: only [[x1, y1, x2, y2]] boxes parse, a record without one leaves the denominator).
A missing or unreadable image stops the run, naming the benchmark file, record and image; --skip-bad skips
such records instead (one warning each; counted in the task's `n_skipped`).

--zoom (RSCoVLM's Zoom-in Chain): for an image over the processor's pixel budget, pass 1 asks, on the
downscaled image, for the box of the region that answers the question; pass 2 asks the question on that
region cut from the full-resolution image (with a margin, and at least the budget's side long so it is seen
near native resolution). Boxes answered on a crop are mapped back to the full image before scoring.
--speed runs plain and think modes into OUT/plain and OUT/think and writes a Table-V-style OUT/speed.md;
--speed-weights float32,bfloat16,int8 does that once per weight format, each in a fresh process (so each peak
memory is that format's own) into OUT/<format>/, and OUT/speed.md puts their rows side by side.
--quantize int8 evaluates with int8 weights (CPU decoding; see checkpoint.load_int8).

--endpoint asks a server (serve.py, vLLM, lmdeploy, a hosted model) instead: one greedy chat request per record
(think mode's system prompt in a system message, then the image and the same user text), max_tokens as
--max-new-tokens, --concurrency requests in flight, the key from $OPENAI_API_KEY (or --api-key-env). Each image
goes whole, as a data URL of the file's own bytes, so a server with this repository's processor sees the pixels
a local run sees. Output lines keep the request's "messages" (the image named by its path) instead of "prompt";
"seconds" is a request's latency. Files resume as local runs do; their meta names the endpoint and served model.
Zoom and --speed need a local model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint as CK
from data import REASONING_SYSTEM_PROMPT, TASK_PROMPTS, Processor, load_image
from distributed import teardown_distributed
from model import DTYPES, pick_dtype
from rewards import closed_match, extract_answer, iou, parse_boxes
from training import PeakMemory

TASKS = {  # name: (file stem under --data-root, task type, group), in Table I's order
    "AID": ("cls_AID", "cls", "classification"),
    "METER-ML": ("cls_METER_ML", "cls", "classification"),
    "NWPU": ("cls_NWPU_RESISC45", "cls", "classification"),
    "SIRI-WHU": ("cls_SIRI_WHU", "cls", "classification"),
    "WHU-RS19": ("cls_WHU_RS19", "cls", "classification"),
    "HR-comp": ("RSVQA_HR-comp_RSVQA", "vqa", "vqa"),
    "HR-presence": ("RSVQA_HR-presence_RSVQA", "vqa", "vqa"),
    "LR-comp": ("RSVQA_LR-comp_RSVQA", "vqa", "vqa"),
    "LR-presence": ("RSVQA_LR-presence_RSVQA", "vqa", "vqa"),
    "LR-rural": ("RSVQA_LR-rural_urban_RSVQA", "vqa", "vqa"),
    "DIOR-RSVG": ("VG_DOIR_RSVG_test", "bbox", "grounding"),
    "LHRS-Bench": ("LHRS-Bench", "mcq", "knowledge"),
}
GROUPS = {"classification": "Classification", "vqa": "VQA", "grounding": "Grounding",
          "knowledge": "Gen. Know.", "custom": "Other"}
TASK_TYPES = ("cls", "vqa", "bbox", "mcq")
MODES = ("plain", "think", "qwen")
LHRS_TYPES = {"1": "identity", "2": "color", "3": "orientation", "4": "shape", "5": "quantity", "6": "area",
              "7": "distance", "8": "resolution", "9": "modality", "10": "location", "11": "reasoning"}
AREA_LEVELS = (("S", 32 ** 2), ("M", 96 ** 2), ("L", math.inf))  # by ground-truth box area in pixels

PROMPT_STYLES = ("public", "ours")
# public: the user text rs_evaluation.py sends a TinyRS model (LMDeployLM's {CLS}/{VQA}/{VG} prefixes, no suffix).
PUBLIC = {"cls": "{CLS} {q}", "mcq": "{q}",
          "vqa": "{VQA} {q} ", "bbox": "{VG} {q} "}  # " " + empty suffix kept: token ids match the public runs
# ours: data.TASK_PROMPTS, the very wording our SFT/GRPO data wraps questions in (a VHM task tag, then a short
# answer instruction; boxes come back as [[x1, y1, x2, y2]] in 0..1000). Think mode adds the GRPO system prompt
# to either. qwen: our wording of the base model's habits, with its native grounding request, answered as
# (x1,y1),(x2,y2).
QWEN = {"cls": "{q}\nAnswer with the name of one scene class.",
        "vqa": "{q}\nAnswer the question using a single word or phrase.",
        "bbox": "Output the bounding box of <|object_ref_start|>{q}<|object_ref_end|> in the image.",
        "mcq": "{q}\nAnswer with the letter of the correct option."}
ZOOM_QUESTION = 'the part of the image needed to answer "{q}"'  # pass 1 asks for this region as a box


def user_text(question: str, task_type: str, mode: str, prompts: str = "public") -> str:
    """The user turn's text, which follows the image."""
    if prompts not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {prompts!r}; expected one of {PROMPT_STYLES}")
    tpl = (QWEN if mode == "qwen" else PUBLIC if prompts == "public" else TASK_PROMPTS)[task_type]
    return tpl.replace("{q}", question)


def build_prompt(proc, question: str, task_type: str, mode: str, prompts: str = "public") -> str:
    """The full chat text (image placeholder not yet expanded) for one question."""
    content = [{"type": "image"}, {"type": "text", "text": user_text(question, task_type, mode, prompts)}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                    system_prompt=REASONING_SYSTEM_PROMPT if mode == "think" else None)


def chat_messages(question: str, task_type: str, mode: str, prompts: str, image_url: str) -> list[dict]:
    """build_prompt's prompt as an OpenAI chat request: think mode's system prompt in a system message (without
    one the server's chat template adds its default, as build_prompt does), then the image and the text."""
    system = [{"role": "system", "content": REASONING_SYSTEM_PROMPT}] if mode == "think" else []
    return system + [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}, {
        "type": "text", "text": user_text(question, task_type, mode, prompts)}]}]


# ---------------------------------------------------------------------------------------------------------
# Benchmark files
@dataclass
class Record:
    index: int
    image: str
    question: str
    answer: object
    types: list = field(default_factory=list)
    source: str = ""  # the benchmark file, for error messages


class BadImage(ValueError):
    """A benchmark image that is missing or cannot be read (skipped under --skip-bad)."""


def image_error(rec: Record, e: Exception) -> BadImage:
    return BadImage(f"{rec.source or 'benchmark file'}, record {rec.index}: cannot read image {rec.image} ({e})")


def image_size(rec: Record) -> tuple[int, int]:
    """(w, h) from the image's header, without decoding its pixels."""
    from PIL import Image
    try:
        with Image.open(rec.image) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise image_error(rec, e) from e


def read_image(rec: Record):
    try:
        return load_image(rec.image)
    except (OSError, ValueError) as e:  # missing, or pixels that fail to decode (e.g. a truncated file)
        raise image_error(rec, e) from e


def skip_or_stop(skip: bool, e: BadImage, say: bool = True):
    """--skip-bad: one warning line (`say`: on the rank that met it) and go on; otherwise stop the run."""
    if not skip:
        raise SystemExit(f"{e}; fix or remove the record, or pass --skip-bad to skip such records")
    if say:
        tqdm.write(f"warning: skipped {e}", file=sys.stderr)  # above the progress bar, not inside it


def load_records(path) -> list[Record]:
    """Records of an RSRM-layout file; images sit in the folder named after the file unless `image_path`.
    Turns come under `conversations` (or `conversation`, which ScoreRS's script also reads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "image" not in it:
            raise ValueError(f"{path}: record {i} is not an object with an 'image'")
        turns = {}
        for t in it.get("conversations") or it.get("conversation") or []:
            if isinstance(t, dict):
                turns.setdefault(t.get("from"), t.get("value"))  # the first of each
        if turns.get("human") is None or turns.get("gpt") is None:
            raise ValueError(f"{path}: record {i} has no human or no gpt turn in 'conversations'")
        folder = Path(it.get("image_path") or path.stem)
        folder = folder if folder.is_absolute() else path.parent / folder
        question = re.sub(r"<image>\s*", "", str(turns["human"])).strip()
        types = it.get("type") or []
        out.append(Record(i, str(folder / it["image"]), question, turns["gpt"],
                          [str(t) for t in (types if isinstance(types, list) else [types])], str(path)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Scoring: one code path for the main command, `score` and the test's recomputation
def pixel_boxes(answer) -> list[list[float]]:
    """Ground-truth boxes in pixels: "[x1, y1, x2, y2]" in text, or a list (of lists) of numbers; not clamped to
    1000 as model outputs are (pixel boxes of large images go past it)."""
    if not isinstance(answer, (list, tuple)):
        return parse_boxes(str(answer), limit=None)
    boxes = [answer] if answer and not isinstance(answer[0], (list, tuple)) else answer
    boxes = [[float(v) for v in b] for b in boxes if len(b) == 4]
    return [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])] for b in boxes]


def area_level(box) -> str:
    area = (box[2] - box[0]) * (box[3] - box[1])
    return next(name for name, limit in AREA_LEVELS if area < limit)


def public_answer_text(raw) -> str:
    """The answer as the public code cuts it from a raw output: the text after the first </reasoning> (all of
    it when the reasoning is unclosed), then what lies inside <answer>, if any."""
    p = str(raw)
    if "<reasoning>" in p:
        try:
            p = p.split("<reasoning>")[1].split("</reasoning>")[1]
        except IndexError:  # unclosed reasoning: the public code keeps the whole text
            pass
    if "<answer>" in p:
        p = p.split("<answer>")[1].split("</answer>")[0]
    return p


PUBLIC_BOX = re.compile(r"\[\[(\d+)[,\s]+(\d+)[,\s]+(\d+)[,\s]+(\d+)\]\]")  # the public TinyRS box pattern


def lenient_match(raw, answer, task_type: str) -> float:
    """The public evaluation's rule, kept only so numbers compare with published ones: public_answer_text,
    remove spaces, cut at the first '.' (and ',' for cls/vqa), lower-case, then `prediction in answer`.
    Empty or truncated-to-nothing predictions count as correct."""
    p, a = public_answer_text(raw), str(answer)
    if task_type == "mcq":
        p = p.split(".")[0].replace(" ", "").lower()
        a = a.replace(" ", "").replace(".", "").lower()
    else:
        p = p.replace(" ", "").split(".")[0].split(",")[0].strip().lower()
        a = a.replace(" ", "").strip().lower()
    return float(p in a)


def score_record(task_type: str, pred, answer, question: str = "", size=None, crop=None) -> dict:
    """Fields scoring one raw output `pred`. bbox: predicted boxes are 0..1000 of the view the model saw
    (the image, or `crop` [x0, y0, x1, y1] of it), scaled to pixels of an image of `size` [w, h].
    Strict (`iou`): boxes in any form we parse, clamped to 0..1000; each ground-truth box is paired with the
    predicted box in the same position (missing: IoU 0). Public (`iou_public`): only PUBLIC_BOX boxes of
    public_answer_text, not clamped, zipped with the ground truth (unpaired boxes are not counted). The public
    code unpacks `size` as (h, w) while files and PIL give (w, h); we scale with [w, h] (DIOR-RSVG is square,
    so the figures agree)."""
    text = extract_answer(pred)
    if task_type == "bbox":
        gts = pixel_boxes(answer)
        if not gts:
            raise ValueError(f"ground truth {answer!r} has no [x1, y1, x2, y2] box")
        if not size:
            raise ValueError("grounding needs the image size [w, h]")
        x0, y0, x1, y1 = crop or (0, 0, size[0], size[1])
        sx, sy = (x1 - x0) / 1000, (y1 - y0) / 1000

        def to_pixels(bs):
            return [[x0 + b[0] * sx, y0 + b[1] * sy, x0 + b[2] * sx, y0 + b[3] * sy] for b in bs]
        boxes = to_pixels(parse_boxes(text))
        ious = [iou(boxes[i], g) if i < len(boxes) else 0.0 for i, g in enumerate(gts)]
        public = to_pixels([[float(v) for v in m] for m in PUBLIC_BOX.findall(public_answer_text(pred))])
        return {"parsed": [[round(v, 2) for v in b] for b in boxes], "iou": ious,
                "level": [area_level(g) for g in gts], "score": sum(ious) / len(ious),
                "iou_public": [iou(b, g) for b, g in zip(public, gts)]}
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")
    # Options are read from the question only for multiple choice, where "B" must match "B. forest".
    strict = closed_match(text, answer, question if task_type == "mcq" else None)
    return {"parsed": text, "strict": strict, "lenient": lenient_match(pred, answer, task_type), "score": strict}


def _mean(xs):
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else None


def summarize(task_type: str, lines) -> dict:
    """Task metrics from record lines ({"pred", "answer", "question"?, "size"?, "type"?, "crop"?, timing?}),
    each rescored from its raw output."""
    rows = [dict(ln, **score_record(task_type, ln["pred"], ln["answer"], ln.get("question", ""),
                                    ln.get("size"), ln.get("crop"))) for ln in lines]
    m = {"n": len(rows)}
    if task_type == "bbox":
        pairs = [(v, lv) for r in rows for v, lv in zip(r["iou"], r["level"])]
        public = [v for r in rows for v in r["iou_public"]]  # records without a public box add nothing
        m.update({"pr@0.5": _mean(v >= 0.5 for v, _ in pairs), "mean_iou": _mean(v for v, _ in pairs),
                  "n_boxes": len(pairs), "n_no_box": sum(not r["parsed"] for r in rows),
                  "pr@0.5_public": _mean(v >= 0.5 for v in public), "n_boxes_public": len(public)})
        for name, _ in AREA_LEVELS:
            sel = [v for v, lv in pairs if lv == name]
            m[f"pr@0.5_{name}"], m[f"n_{name}"] = _mean(v >= 0.5 for v in sel), len(sel)
        m["score"], m["score_lenient"] = m["pr@0.5"], m["pr@0.5_public"]
    else:
        m.update({"acc_strict": _mean(r["strict"] for r in rows), "acc_lenient": _mean(r["lenient"] for r in rows),
                  "n_empty": sum(not r["parsed"] for r in rows)})
        if task_type == "mcq":
            per = {}
            for r in rows:
                types = r.get("type") or []
                for t in types if isinstance(types, list) else [types]:  # one type may come bare
                    per.setdefault(LHRS_TYPES.get(str(t), str(t)), []).append(r)
            m["by_type"] = {k: {"n": len(v), "acc_strict": _mean(r["strict"] for r in v),
                                "acc_lenient": _mean(r["lenient"] for r in v)} for k, v in sorted(per.items())}
        m["score"], m["score_lenient"] = m["acc_strict"], m["acc_lenient"]
    timed = [r for r in rows if "seconds" in r]
    if timed:  # endpoint runs: seconds is each request's latency, and the server's memory is not known
        secs, toks = sum(r["seconds"] for r in timed), sum(r["new_tokens"] for r in timed)
        mem = [r["peak_mem_gb"] for r in timed if r.get("peak_mem_gb") is not None]
        m.update({"sec_per_sample": secs / len(timed), "tokens_per_sec": toks / secs if secs > 0 else None,
                  "new_tokens_mean": toks / len(timed), "peak_mem_gb": max(mem) if mem else None})
    return m


# ---------------------------------------------------------------------------------------------------------
# Zoom-in chain geometry
def zoom_crop(box, size, min_side: int, margin: float = 0.25) -> list[int]:
    """Full-resolution crop [x0, y0, x1, y1] for `box` given in 0..1000 of a downscaled view of an image of
    `size` [w, h]. The view shows the whole image, so 0..1000 spans 0..w and 0..h whatever the downscale.
    The box grows by `margin` of its size per side (context, and slack for a coarse first look), then to at
    least `min_side` (a smaller crop would only be upsampled), and is shifted, not shrunk, to fit inside."""
    out = []
    for lo, hi, limit in ((box[0], box[2], size[0]), (box[1], box[3], size[1])):
        lo, hi = lo * limit / 1000, hi * limit / 1000
        pad = (hi - lo) * margin
        lo, hi = lo - pad, hi + pad
        grow = max(max(min_side, 28) - (hi - lo), 0) / 2
        lo, hi = lo - grow, hi + grow
        shift = max(-lo, 0) - max(hi - limit, 0)
        out.append((max(math.floor(lo + shift), 0), min(math.ceil(hi + shift), limit)))
    return [out[0][0], out[1][0], out[0][1], out[1][1]]


# ---------------------------------------------------------------------------------------------------------
# Running a model
@dataclass
class Run:
    model: object
    proc: object
    mode: str = "plain"
    prompts: str = "public"
    skip_bad: bool = False
    batch_size: int = 8
    max_new_tokens: int = 256
    zoom: bool = False
    rank: int = 0
    world: int = 1
    mem: PeakMemory | None = None
    endpoint: Endpoint | None = None  # set: records go to an OpenAI-compatible server instead of `model`


@dataclass
class Endpoint:
    client: object  # openai.OpenAI
    model: str  # the served model's name
    concurrency: int = 8


def generate(run: Run, texts, images) -> tuple[list[str], list[int]]:
    """Greedy outputs (decoded up to the first stop token) and their token counts, stop included."""
    b = run.proc(text=texts, images=images, padding_side="left")
    new = run.model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"],
                             max_new_tokens=run.max_new_tokens, temperature=0.0)
    eos = set(run.model.default_eos())
    outs, counts = [], []
    for row in new.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        outs.append(run.proc.decode(row[:n]))
        counts.append(n)
    return outs, counts


def run_batch(run: Run, task_type: str, recs: list[Record]) -> list[dict]:
    t0 = time.perf_counter()
    images, good = [], []
    for r in recs:
        try:
            images.append(read_image(r))
            good.append(r)
        except BadImage as e:
            skip_or_stop(run.skip_bad, e)
    recs = good
    if not recs:
        return []
    sizes = [list(im.size) for im in images]
    crops, firsts, first_tokens = [None] * len(recs), {}, [0] * len(recs)
    if run.zoom:
        big = [i for i, im in enumerate(images) if im.width * im.height > run.proc.image_processor.max_pixels]
        if big:
            texts = [build_prompt(run.proc, ZOOM_QUESTION.replace("{q}", recs[i].question), "bbox", run.mode,
                                  run.prompts) for i in big]
            outs, counts = generate(run, texts, [images[i] for i in big])
            side = int(math.sqrt(run.proc.image_processor.max_pixels))
            for i, text, out, n in zip(big, texts, outs, counts):
                firsts[i], first_tokens[i] = (text, out), n
                boxes = parse_boxes(extract_answer(out))
                if boxes:  # no box: pass 2 sees the whole (downscaled) image, as without --zoom
                    crops[i] = zoom_crop(boxes[0], sizes[i], side)
                    images[i] = images[i].crop(tuple(crops[i]))
    prompts = [build_prompt(run.proc, r.question, task_type, run.mode, run.prompts) for r in recs]
    outs, counts = generate(run, prompts, images)
    seconds = (time.perf_counter() - t0) / len(recs)  # batch time shared evenly: per-sample latency
    mem = run.mem.gb() if run.mem else 0.0
    lines = []
    for i, r in enumerate(recs):
        line = record_line(r, sizes[i], prompt=prompts[i], pred=outs[i])
        if i in firsts:
            line["zoom_prompt"], line["zoom_pred"] = firsts[i]
            line["crop"] = crops[i]
        line.update(score_record(task_type, outs[i], r.answer, r.question, sizes[i], crops[i]))
        line.update(seconds=seconds, new_tokens=counts[i] + first_tokens[i], peak_mem_gb=mem)
        lines.append(line)
    return lines


def record_line(r: Record, size, **fields) -> dict:
    """The start of a record's output line; `fields`: what was sent and what came back."""
    line = {"index": r.index, "id": os.path.basename(r.image), "question": r.question, "answer": r.answer,
            "size": size, **fields}
    if r.types:
        line["type"] = r.types
    return line


def prompt_length(run: Run, rec: Record, task_type: str) -> int:
    w, h = image_size(rec)  # header only: the size, not the pixels
    text = build_prompt(run.proc, rec.question, task_type, run.mode, run.prompts)
    return len(run.proc.encode(text)) + run.proc.image_processor.num_image_tokens(h, w)


# ---------------------------------------------------------------------------------------------------------
# Asking an OpenAI-compatible server (--endpoint)
SERVER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what OpenAI-compatible servers take as data URLs


def exact_data_url(rec: Record) -> tuple[str, list[int]]:
    """(data URL, [w, h]) of a record's image at full resolution: the file's own bytes when servers take its
    format, else its decoded pixels as a lossless PNG. Either way the server decodes exactly the pixels a local
    run sees and its processor sizes them as a local run does; a bounded, re-encoded copy (data.image_data_url,
    what the judge gets) would change the pixels, and the scores with them."""
    import base64
    import io
    img = read_image(rec)  # decoded whole, so a truncated file fails here as it does in a local run
    try:
        with open(rec.image, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise image_error(rec, e) from e
    from PIL import Image
    fmt = Image.open(io.BytesIO(raw)).format
    if fmt not in SERVER_FORMATS:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        raw, fmt = buf.getvalue(), "PNG"
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(raw).decode(), list(img.size)


def ask_endpoint(run: Run, task_type: str, rec: Record) -> dict:
    """One record as one greedy chat request; its output line (the image named by its path, not inlined)."""
    url, size = exact_data_url(rec)
    messages = chat_messages(rec.question, task_type, run.mode, run.prompts, url)
    t0 = time.perf_counter()
    r = run.endpoint.client.chat.completions.create(model=run.endpoint.model, messages=messages, temperature=0,
                                                    max_tokens=run.max_new_tokens)
    seconds = time.perf_counter() - t0
    pred = (r.choices[0].message.content or "") if r.choices else ""
    messages[-1]["content"][0]["image_url"]["url"] = rec.image
    line = record_line(rec, size, messages=messages, pred=pred)
    line.update(score_record(task_type, pred, rec.answer, rec.question, size))
    line.update(seconds=seconds, new_tokens=r.usage.completion_tokens if r.usage else 0)
    return line


def run_endpoint(run: Run, name: str, task_type: str, todo: list[Record], sink: Path):
    """`todo` with up to --concurrency requests in flight; lines written as answers come (resumable)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    import openai
    pool = ThreadPoolExecutor(max(1, run.endpoint.concurrency))
    bar = tqdm(total=len(todo), desc=name, dynamic_ncols=True)
    try:
        futures = {pool.submit(ask_endpoint, run, task_type, r): r for r in todo}
        with open(sink, "a", encoding="utf-8") as f:
            for fut in as_completed(futures):
                r = futures[fut]
                try:
                    f.write(json.dumps(fut.result()) + "\n")
                    f.flush()
                except BadImage as e:
                    skip_or_stop(run.skip_bad, e)
                except openai.APIError as e:  # answers so far are kept: a rerun resumes after them
                    raise SystemExit(f"{r.source}, record {r.index}: the endpoint failed: {e}") from e
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def endpoint_run(a) -> tuple[Run, dict]:
    """A Run that asks the server at --endpoint, and the run settings it adds to each task's meta."""
    if a.zoom or a.speed:
        raise SystemExit(f"{'--zoom' if a.zoom else '--speed'} needs a local model (--model): zoom crops and "
                         "re-asks per record, speed measures local latency and memory")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("--endpoint runs in one process; use --concurrency for parallel requests, not torchrun")
    import openai  # only this path needs it
    from urllib.parse import urlsplit
    url = a.endpoint.rstrip("/")
    url += "/v1" if not urlsplit(url).path else ""  # http://host:8000 means its /v1
    client = openai.OpenAI(base_url=url, api_key=os.environ.get(a.api_key_env) or "EMPTY")
    name = a.served_model
    if not name:  # the server's only model, if it has exactly one
        try:
            names = [m.id for m in client.models.list().data]
        except openai.APIError as e:
            raise SystemExit(f"cannot list the models of {url}: {e}; give --served-model") from e
        if len(names) != 1:
            raise SystemExit(f"{url} serves {names}: choose one with --served-model")
        name = names[0]
    run = Run(None, None, prompts=a.prompts, skip_bad=a.skip_bad, endpoint=Endpoint(client, name, a.concurrency))
    return run, {"endpoint": url, "served_model": name}


# ---------------------------------------------------------------------------------------------------------
# Output files: OUT/<task>.jsonl = header line {"meta": ...} + record lines, kept sorted by index
def read_jsonl(path) -> tuple[dict | None, list[dict]]:
    meta, lines = None, []
    if Path(path).exists():
        for raw in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:  # a line cut short by an interruption: redone
                continue
            if isinstance(obj, dict) and "meta" in obj:
                meta = meta or obj["meta"]
            elif isinstance(obj, dict) and "index" in obj:
                lines.append(obj)
    return meta, lines


def consolidate(path: Path, meta: dict) -> list[dict]:
    """Rewrite OUT/<task>.jsonl with its own lines and those of rank part files, deduplicated and sorted."""
    parts = sorted(path.parent.glob(f"{path.stem}.part*.jsonl"))
    lines = {}
    for p in [path] + parts:
        for ln in read_jsonl(p)[1]:
            lines.setdefault(ln["index"], ln)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for k in sorted(lines):
            f.write(json.dumps(lines[k]) + "\n")
    os.replace(tmp, path)  # atomic, so an interruption here loses nothing
    for p in parts:
        p.unlink()
    return [lines[k] for k in sorted(lines)]


def prepare_output(path: Path, meta: dict, overwrite: bool) -> str | None:
    """Rank 0, before a task: refuse a file from another run (unless overwrite), fold in leftover parts."""
    old, _ = read_jsonl(path)
    if path.exists() and not overwrite and old != meta:
        diff = [k for k in meta if (old or {}).get(k) != meta[k]] if old else ["no header line"]
        return (f"{path} belongs to a different run ({', '.join(diff)} differ); pass --overwrite to redo it, "
                f"or choose another --out")
    if overwrite:
        for p in [path, *path.parent.glob(f"{path.stem}.part*.jsonl")]:
            p.unlink(missing_ok=True)
    consolidate(path, meta)
    return None


def _sync(run: Run, obj=None):
    """Barrier; returns rank 0's `obj` on every rank."""
    if run.world == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_local(run: Run, name: str, task_type: str, todo: list[Record], sink: Path):
    """This rank's share of `todo`, in batches through the local model; lines written as batches finish."""
    lengths = {}
    for r in todo:
        try:
            lengths[r.index] = prompt_length(run, r, task_type)
        except BadImage as e:  # every rank reads every header: rank 0 alone warns
            skip_or_stop(run.skip_bad, e, say=run.rank == 0)
    todo = [r for r in todo if r.index in lengths]
    # Longest prompts first, so a batch pads little; batches dealt out whole, round robin, so every batch
    # (and hence every output) is the same for any number of ranks, including more ranks than batches.
    todo.sort(key=lambda r: -lengths[r.index])
    batches = [todo[i:i + run.batch_size] for i in range(0, len(todo), run.batch_size)][run.rank::run.world]
    if run.mem:
        run.mem.reset()
    bar = tqdm(total=sum(map(len, batches)), desc=name, disable=run.rank != 0, dynamic_ncols=True)
    with open(sink, "a", encoding="utf-8") as f:
        for batch in batches:
            for line in run_batch(run, task_type, batch):
                f.write(json.dumps(line) + "\n")
            f.flush()  # written as it goes: an interrupted run resumes from here
            bar.update(len(batch))
    bar.close()


def evaluate_task(run: Run, name: str, path: Path, task_type: str, out_dir: Path, meta: dict,
                  limit: int | None = None, overwrite: bool = False) -> dict | None:
    """Run (or resume) one task; rank 0 returns its metrics, other ranks None."""
    records = load_records(path)[:limit]
    out = out_dir / f"{name}.jsonl"
    meta = dict(meta, task_file=str(Path(path).resolve()), task_type=task_type,
                task_sha1=hashlib.sha1(Path(path).read_bytes()).hexdigest())  # an edited file is another run
    err = _sync(run, prepare_output(out, meta, overwrite) if run.rank == 0 else None)
    if err:
        raise SystemExit(err)
    done = {ln["index"] for ln in read_jsonl(out)[1]}
    todo = [r for r in records if r.index not in done]
    sink = out if run.world == 1 else out_dir / f"{name}.part{run.rank}.jsonl"
    (run_endpoint if run.endpoint else run_local)(run, name, task_type, todo, sink)
    _sync(run)
    if run.rank != 0:
        return None
    wanted = {r.index for r in records}
    lines = [ln for ln in consolidate(out, meta) if ln["index"] in wanted]
    return dict(summarize(task_type, lines), n_skipped=len(records) - len(lines))  # --skip-bad; 0 otherwise


# ---------------------------------------------------------------------------------------------------------
# Reports
def group_averages(tasks: dict) -> dict:
    out = {}
    for t in tasks.values():
        out.setdefault(t["group"], []).append(t)
    return {g: {"score": _mean(t["score"] for t in ts) if all(t["score"] is not None for t in ts) else None,
                "score_lenient": _mean(t["score_lenient"] for t in ts) if all(
                    t["score_lenient"] is not None for t in ts) else None, "n_tasks": len(ts)}
            for g, ts in out.items()}


def _cell(score, lenient) -> str:
    if score is None:
        return "-"
    return f"{100 * score:.1f}" + (f" / {100 * lenient:.1f}" if lenient is not None else "")


def table(runs: dict) -> str:
    """Markdown table in Table I's layout, one column per run: {label: metrics.json content}."""
    names = list(dict.fromkeys(n for m in runs.values() for n in m["tasks"]))
    order = list(GROUPS)
    groups = sorted({m["tasks"][n]["group"] for m in runs.values() for n in m["tasks"]}, key=order.index)
    rows = ["| Capability | Benchmark | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for g in groups:
        first = True
        for n in [n for n in names if any(m["tasks"].get(n, {}).get("group") == g for m in runs.values())]:
            cells = [_cell(m["tasks"][n]["score"], m["tasks"][n]["score_lenient"]) if n in m["tasks"] else "-"
                     for m in runs.values()]
            rows.append(f"| {GROUPS[g] if first else ''} | {n} | " + " | ".join(cells) + " |")
            first = False
        avgs = [group_averages(m["tasks"]).get(g) for m in runs.values()]
        rows.append("| | Average | " + " | ".join(_cell(a["score"], a["score_lenient"]) if a else "-"
                                                for a in avgs) + " |")
    note = ("\nCells: accuracy % strict / lenient (the public `prediction in answer` rule, which counts empty "
            "answers as correct); grounding: Pr@0.5 % strict (no box: a miss) / public (only [[x1, y1, x2, y2]] "
            "boxes parse; a record without one is left out).\n")
    return "\n".join(rows) + "\n" + note


def speed_table(runs: dict) -> str:
    """Table-V-style: latency, throughput and peak memory per run (over all its samples), group scores."""
    groups = [g for g in GROUPS if g != "custom"]
    rows = ["| Run | sec/sample | new tokens/sample | tokens/s | peak mem GB | " + " | ".join(
        GROUPS[g] for g in groups) + " |", "|---" * (5 + len(groups)) + "|"]
    lat = []
    for label, m in runs.items():
        ts = [t for t in m["tasks"].values() if "sec_per_sample" in t]
        n = sum(t["n"] for t in ts) or 1
        secs, toks = (sum(t[k] * t["n"] for t in ts) / n for k in ("sec_per_sample", "new_tokens_mean"))
        lat.append(secs)
        avg = group_averages(m["tasks"])
        rows.append(f"| {label} | {secs:.3f} | {toks:.1f} | {toks / secs if secs else 0:.1f} | "
                    f"{max((t['peak_mem_gb'] for t in ts), default=0):.2f} | "
                    + " | ".join(_cell(avg[g]["score"], None) if g in avg else "-" for g in groups) + " |")
    if len(lat) == 2 and lat[0]:
        rows.append(f"\nLatency {' / '.join(reversed(list(runs)))}: {lat[1] / lat[0]:.2f}x")
    return "\n".join(rows) + "\n"


def write_reports(out_dir: Path, meta: dict, tasks: dict) -> dict:
    path = out_dir / "metrics.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    keep = old.get("tasks", {}) if old.get("meta") == meta else {}  # tasks of earlier calls, same run
    m = {"meta": meta, "tasks": {**keep, **tasks}}
    m["groups"] = group_averages(m["tasks"])
    path.write_text(json.dumps(m, indent=2))
    label = Path(meta["model"]).name if "model" in meta else meta["served_model"]
    (out_dir / "results.md").write_text(table({f"{label} ({meta['mode']})": m}))
    return m


# ---------------------------------------------------------------------------------------------------------
# Command line
def cmd_score(argv) -> int:
    ap = argparse.ArgumentParser(prog="evaluate.py score", description="Score predictions of any system: one "
                                 'JSON per line {"pred", "answer", "size": [w, h] (bbox), "type": [...] (mcq), '
                                 '"question" or "query" (mcq: its options map a letter to its text), "image" or '
                                 '"filename"}: evaluate.py\'s rows and the public script\'s output rows alike.')
    ap.add_argument("--task-type", required=True, choices=TASK_TYPES)
    ap.add_argument("file")
    a = ap.parse_args(argv)
    if not Path(a.file).is_file():
        raise SystemExit(f"predictions file not found: {a.file}")
    lines = []
    for k, text in enumerate(Path(a.file).read_text(encoding="utf-8").splitlines(), 1):
        try:
            obj = json.loads(text) if text.strip() else {"meta": None}
        except json.JSONDecodeError as e:
            raise SystemExit(f"{a.file}, line {k}: not JSON ({e})")
        if "meta" in obj:  # blank lines and evaluate.py's header
            continue
        need = ("pred", "answer") + (("size",) if a.task_type == "bbox" else ())
        if any(key not in obj for key in need):
            raise SystemExit(f"{a.file}, line {k}: needs {', '.join(need)}")
        obj.setdefault("question", obj.get("query", ""))  # the public rows keep the question as "query"
        obj.setdefault("id", os.path.basename(str(obj.get("image") or obj.get("filename") or "")))
        try:
            score_record(a.task_type, obj["pred"], obj["answer"], obj["question"], obj.get("size"), obj.get("crop"))
        except (ValueError, TypeError, IndexError) as e:
            raise SystemExit(f"{a.file}, line {k} ({obj['id'] or 'no image named'}): {e}")
        lines.append(obj)
    print(json.dumps(summarize(a.task_type, lines), indent=2))
    return 0


def cmd_compare(argv) -> int:
    ap = argparse.ArgumentParser(prog="evaluate.py compare", description="Runs side by side, like Table I.")
    ap.add_argument("outs", nargs="+", help="output folders of evaluate.py (each with metrics.json)")
    runs = {}
    for d in ap.parse_args(argv).outs:
        p = Path(d) / "metrics.json"
        if not p.is_file():
            raise SystemExit(f"no metrics.json in {d}")
        m = json.loads(p.read_text())
        runs[f"{d} ({m['meta']['mode']})"] = m
    print(table(runs))
    return 0


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder or hub id (or --endpoint)")
    ap.add_argument("--endpoint", help="instead of --model: an OpenAI-compatible server's URL (serve.py, vLLM,\n"
                                       "lmdeploy, a hosted API), e.g. http://127.0.0.1:8000/v1; the same prompts\n"
                                       "as chat requests, greedy, each image sent whole as a data URL")
    ap.add_argument("--served-model", help="the model name the endpoint serves (default: its only one)")
    ap.add_argument("--concurrency", type=int, default=8, help="--endpoint: requests in flight")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="--endpoint: the environment variable that holds its API key")
    ap.add_argument("--data-root", help="folder holding the benchmark JSON files and image folders")
    ap.add_argument("--tasks", help=f"all, or comma-separated names among: {', '.join(TASKS)}")
    ap.add_argument("--task-file", action="append", default=[],
                    help="any other file in the RSRM layout, named by its stem (repeatable; needs --task-type)")
    ap.add_argument("--task-type", action="append", default=[], choices=TASK_TYPES,
                    help="the type of each --task-file, in order, or one for all")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="plain", choices=MODES,
                    help="plain; think (adds the R1 reasoning system prompt); qwen (the base model's wording)")
    ap.add_argument("--prompts", default="public", choices=PROMPT_STYLES,
                    help="plain/think wording: public (default), the public evaluation's TinyRS prompts\n"
                         "('{CLS} q', '{VQA} q ', '{VG} q ', bare LHRS-Bench q); ours, data.TASK_PROMPTS")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="first N records of each task")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64, or 1024 in think mode")
    ap.add_argument("--min-pixels", type=int, default=None)
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--zoom", action="store_true", help="Zoom-in Chain for images over the pixel budget")
    ap.add_argument("--speed", action="store_true", help="run plain and think modes, print a Table-V comparison")
    ap.add_argument("--overwrite", action="store_true", help="redo tasks whose output belongs to another run")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip records whose image is missing or unreadable (a warning each; counted in\n"
                         "n_skipped) instead of stopping")
    ap.add_argument("--speed-weights", default=None, metavar="LIST",
                    help=f"with --speed: comma-separated weight formats among {', '.join(WEIGHTS)},\n"
                         "each run in its own process (e.g. float32,bfloat16,int8 on CPU)")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    ap.add_argument("--quantize", choices=["int8"], default=None, help="int8 weights per output channel (CPU)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    if a.speed_weights is not None:
        a.speed_weights = [w.strip() for w in a.speed_weights.split(",") if w.strip()]
        bad = [w for w in a.speed_weights if w not in WEIGHTS]
        if bad or not a.speed_weights or not a.speed or a.quantize:
            ap.error(f"--speed-weights goes with --speed (not --quantize) and lists formats among {', '.join(WEIGHTS)}"
                     + (f"; unknown: {bad}" if bad else ""))
        if len(a.speed_weights) == 1:  # one format: this process runs it
            w = a.speed_weights[0]
            a.dtype, a.quantize = ("float32", "int8") if w == "int8" else (w, None)
    if bool(a.model) == bool(a.endpoint):
        ap.error("give either --model (a local checkpoint) or --endpoint (a server), not both")
    if a.task_file and len(a.task_type) not in (1, len(a.task_file)):
        ap.error("give one --task-type for all --task-file, or one per --task-file")
    return a


def task_list(a) -> list[tuple]:
    names = [] if a.tasks is None and a.task_file else (list(TASKS) if (a.tasks or "all") == "all"
                                                         else [n.strip() for n in a.tasks.split(",") if n.strip()])
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(TASKS)} (or --task-file)")
    if names and not a.data_root:
        raise SystemExit("--data-root is needed for the named benchmarks")
    jobs = [(n, Path(a.data_root) / f"{TASKS[n][0]}.json", TASKS[n][1], TASKS[n][2]) for n in names]
    for i, f in enumerate(a.task_file):
        jobs.append((Path(f).stem, Path(f), a.task_type[min(i, len(a.task_type) - 1)], "custom"))
    if len({j[0] for j in jobs}) < len(jobs):
        raise SystemExit(f"two tasks share a name (a file's stem): {[j[0] for j in jobs]}")
    missing = [str(j[1]) for j in jobs if not j[1].is_file()]
    if missing:
        raise SystemExit("benchmark file(s) not found: " + ", ".join(missing))
    return jobs


def local_run(a, world: int, rank: int) -> tuple[Run, dict]:
    """A Run on the local --model (process group joined under torchrun, model warmed up), and the run settings
    it adds to each task's meta."""
    device = a.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        import torch.distributed as dist
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    dtype = pick_dtype(a.dtype, device)
    proc = Processor.from_pretrained(a.model, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    model = CK.load(a.model, dtype=dtype, device=device, quantize=a.quantize)
    run = Run(model, proc, prompts=a.prompts, skip_bad=a.skip_bad, batch_size=a.batch_size, zoom=a.zoom,
              rank=rank, world=world, mem=PeakMemory(device))
    from PIL import Image
    b = proc(text=[build_prompt(proc, "warm-up", "vqa", "plain", a.prompts)], images=[Image.new("RGB", (56, 56))])
    model.generate(**b, max_new_tokens=2)  # warm-up: one-time setup is not the first task's latency
    model_id = str(Path(a.model).resolve()) if Path(a.model).exists() else a.model
    return run, {"model": model_id, "min_pixels": proc.image_processor.min_pixels,
                 "max_pixels": proc.image_processor.max_pixels, "dtype": str(dtype).removeprefix("torch."),
                 "device": device.split(":")[0], **({"quantize": a.quantize} if a.quantize else {})}


WEIGHTS = (*DTYPES, "int8")  # --speed-weights: a dtype, or int8 (quantized weights, fp32 compute)


def speed_formats(a, argv: list[str]) -> int:
    """--speed once per --speed-weights format, each a fresh `evaluate.py` process writing OUT/<format>/, then
    OUT/speed.md with every format's plain and think rows."""
    import subprocess
    runs = {}
    for w in a.speed_weights:
        out = Path(a.out) / w
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--speed-weights", w, "--out", str(out)]
        print(f"--- {w}: {' '.join(cmd[2:])}", flush=True)
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"the {w} run failed (its output above); rerun resumes from {out}")
        for mode in ("plain", "think"):
            runs[f"{w} {mode}"] = json.loads((out / mode / "metrics.json").read_text())
    text = f"{a.model} ({', '.join(a.speed_weights)}, batch {a.batch_size})\n\n" + speed_table(runs)
    (Path(a.out) / "speed.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:
        return cmd_score(argv[1:])
    if argv[:1] == ["compare"]:
        return cmd_compare(argv[1:])
    a = parse_args(argv)
    jobs = task_list(a)
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None  # benchmark files are trusted, and ultra-high-resolution scenes are the point
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if a.speed and a.speed_weights and len(a.speed_weights) > 1:
        if world > 1:
            raise SystemExit("--speed-weights with several formats runs them one after another: not under torchrun")
        return speed_formats(a, argv)
    run, base = endpoint_run(a) if a.endpoint else local_run(a, world, rank)
    results = {}
    for mode in (("plain", "think") if a.speed else (a.mode,)):
        out_dir = Path(a.out) / mode if a.speed else Path(a.out)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        _sync(run)
        run.mode = mode
        run.max_new_tokens = a.max_new_tokens or (1024 if mode == "think" else 64)
        # Everything the outputs depend on; a file written under other settings is not resumed.
        meta = {**base, "mode": mode, "prompts": "qwen" if mode == "qwen" else a.prompts,
                "max_new_tokens": run.max_new_tokens, **({} if a.endpoint else {"zoom": a.zoom})}
        tasks = {}
        for name, path, task_type, group in jobs:
            m = evaluate_task(run, name, path, task_type, out_dir, meta, a.limit, a.overwrite)
            if rank == 0:
                tasks[name] = {"group": group, "type": task_type, **m}
        if rank == 0:
            results[mode] = write_reports(out_dir, meta, tasks)
            print(f"\n{mode} mode, {out_dir}:\n" + table({mode: results[mode]}))
    if rank == 0 and a.speed:
        weights = base.get("quantize") or base["dtype"]
        text = f"{base['model']} ({weights}, {base['device']}, batch {a.batch_size})\n\n" + speed_table(results)
        (Path(a.out) / "speed.md").write_text(text)
        print(text)
    if run.mem:
        run.mem.stop()
    if world > 1:
        teardown_distributed()  # a barrier first: rank 0 may still be writing reports
    return 0


if __name__ == "__main__":
    sys.exit(main())
