"""Data for TinyRS: image processor, tokenizer and chat template, conversations, datasets, synthetic RS data."""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

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


# ----------------------------------------------------------------------------------------------------------------
# Image processor, tokenizer wrapper and chat template (Qwen2-VL conventions, see REFERENCE.md §2)
# ----------------------------------------------------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_TOKEN = "<|image_pad|>"
# Files that make up a processor; copied verbatim on save so a round trip changes nothing.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "generation_config.json")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area in [min_pixels, max_pixels], aspect ratio about kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size: height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"image aspect ratio must be at most 200, got {ratio:.1f} ({height}x{width})")
    # Python's round (ties to even) on purpose: the released model was trained with exactly these sizes.
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def to_rgb(img):
    """RGB copy of a PIL image; transparent pixels become white (not black, as a bare convert('RGB') gives)."""
    from PIL import Image
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path_or_pil):
    """An RGB PIL image from a PIL image or a file path; errors name the file."""
    from PIL import Image
    if isinstance(path_or_pil, Image.Image):
        return to_rgb(path_or_pil)
    path = os.fspath(path_or_pil)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so a truncated file fails here, with its name
            return to_rgb(img)
    except Exception as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e


@dataclass
class ImageProcessor:
    """Qwen2-VL image preprocessing: dynamic resolution, CLIP normalisation, 2x2-merge-ordered flat patches."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @classmethod
    def from_dict(cls, cfg: dict | None) -> "ImageProcessor":
        """From a preprocessor_config.json dict: flat min/max_pixels (older) or size{shortest,longest_edge}."""
        cfg = dict(cfg or {})
        size = cfg.get("size") or {}
        lo = size.get("shortest_edge", size.get("min_pixels", cls.min_pixels))
        hi = size.get("longest_edge", size.get("max_pixels", cls.max_pixels))
        # Flat keys win over `size`, as in the released configs where both may appear.
        lo, hi = cfg.get("min_pixels") or lo, cfg.get("max_pixels") or hi
        return cls(min_pixels=int(lo), max_pixels=int(hi), patch_size=int(cfg.get("patch_size", 14)),
                   temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
                   merge_size=int(cfg.get("merge_size", 2)),
                   image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)), image_std=tuple(cfg.get("image_std", CLIP_STD)))

    def to_dict(self) -> dict:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        """LLM tokens an image of this size becomes (one per merged 2x2 patch group)."""
        h, w = self.target_size(height, width)
        return (h // self.factor) * (w // self.factor)

    def preprocess_one(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        from PIL import Image
        img = load_image(image)
        h, w = self.target_size(img.height, img.width)
        # Resample the uint8 image in PIL, then scale in float64 and normalise in float32: the reference
        # pipeline's exact order and precisions, so the numbers match it bit for bit.
        arr = np.asarray(img.resize((w, h), resample=Image.Resampling.BICUBIC))
        arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        arr = (arr - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (C, H, W)
        x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
        # A still image is its own second frame: repeat along a temporal axis placed right after C.
        x = x.unsqueeze(5).expand(gh // m, gw // m, m, m, 3, t, p, p)
        return x.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)

    def __call__(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [sum of patches, 3*t*p*p] float32, image_grid_thw [n, 3] int64) for a list of images."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        outs = [self.preprocess_one(im) for im in images]
        return torch.cat([o[0] for o in outs]), torch.tensor([o[1] for o in outs], dtype=torch.long)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _find_chat_template(folder: str) -> str | None:
    """The jinja chat template shipped with a checkpoint, if any (kept only to write it back on save)."""
    if os.path.isfile(p := os.path.join(folder, "chat_template.jinja")):
        with open(p, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if os.path.isfile(p := os.path.join(folder, name)):
            tpl = _read_json(p).get("chat_template")
            if isinstance(tpl, list):  # named templates: take the default one
                tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
            if tpl:
                return tpl
    return None


@dataclass
class Processor:
    """Text + image inputs for Qwen2-VL: chat template, tokenisation, image-token expansion, padding."""
    tokenizer: object  # tokenizers.Tokenizer
    image_processor: ImageProcessor = field(default_factory=ImageProcessor)
    default_system: str = DEFAULT_SYSTEM
    chat_template: str | None = None
    source_dir: str | None = None

    def __post_init__(self):
        def tid(name):
            i = self.tokenizer.token_to_id(name)
            if i is None:
                raise ValueError(f"tokenizer has no {name} token")
            return i
        self.image_token_id = tid(IMAGE_TOKEN)
        self.vision_start_id, self.vision_end_id = tid("<|vision_start|>"), tid("<|vision_end|>")
        self.im_start_id, self.im_end_id = tid("<|im_start|>"), tid("<|im_end|>")
        self.pad_id = tid("<|endoftext|>")
        self.eos_id = self.im_end_id  # chat turns end with <|im_end|>

    @classmethod
    def from_pretrained(cls, path_or_hub_id, min_pixels: int | None = None, max_pixels: int | None = None):
        from tokenizers import Tokenizer
        folder = os.fspath(path_or_hub_id)
        if not os.path.isdir(folder):
            if os.path.exists(folder):
                raise NotADirectoryError(f"processor path is not a folder: {folder}")
            from huggingface_hub import snapshot_download
            try:
                folder = snapshot_download(repo_id=folder, allow_patterns=list(PROCESSOR_FILES))
            except Exception as e:
                raise OSError(f"{path_or_hub_id!r} is not a local folder and could not be fetched from the "
                              f"Hugging Face Hub: {e}") from e
        tok_path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        pp_path = os.path.join(folder, "preprocessor_config.json")
        ip = ImageProcessor.from_dict(_read_json(pp_path) if os.path.isfile(pp_path) else None)
        if min_pixels is not None:
            ip.min_pixels = int(min_pixels)
        if max_pixels is not None:
            ip.max_pixels = int(max_pixels)
        return cls(Tokenizer.from_file(tok_path), ip, chat_template=_find_chat_template(folder), source_dir=folder)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, system_prompt: str | None = None,
                            add_vision_id: bool = False) -> str:
        """The Qwen2-VL chat prompt for `messages`; a system turn is added when the first turn is not one."""
        parts, n_images = [], 0
        if messages and messages[0]["role"] != "system":
            parts.append(f"<|im_start|>system\n{self.default_system if system_prompt is None else system_prompt}"
                         "<|im_end|>\n")
        for msg in messages:
            parts.append(f"<|im_start|>{msg['role']}\n")
            content = msg["content"]
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, (list, tuple)):
                for item in content:
                    if item.get("type") == "image" or "image" in item or "image_url" in item:
                        n_images += 1
                        parts.append((f"Picture {n_images}: " if add_vision_id else "")
                                     + f"<|vision_start|>{IMAGE_TOKEN}<|vision_end|>")
                    elif item.get("type") == "video" or "video" in item:
                        raise ValueError("video inputs are not supported")
                    elif "text" in item:
                        parts.append(str(item["text"]))
            else:
                raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
            parts.append("<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens such as <|im_start|> recognised as single ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, text, images=None, padding_side: str = "left", return_tensors: str | None = "pt") -> dict:
        """Batch inputs: each <|image_pad|> grows to the image's token count; sequences padded to one length."""
        texts = [text] if isinstance(text, str) else list(text)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        # Accept per-sample lists too; images are consumed in order of appearance either way.
        flat = [im for x in (images or []) for im in (x if isinstance(x, (list, tuple)) else [x])]
        n_slots = sum(t.count(IMAGE_TOKEN) for t in texts)
        if n_slots != len(flat):
            raise ValueError(f"the texts have {n_slots} {IMAGE_TOKEN} tokens but {len(flat)} images were given")
        pixel_values = grid = None
        if flat:
            pixel_values, grid = self.image_processor(flat)
            counts = iter((grid.prod(-1) // self.image_processor.merge_size ** 2).tolist())
            expanded = []
            for t in texts:
                head, *rest = t.split(IMAGE_TOKEN)
                expanded.append(head + "".join(IMAGE_TOKEN * next(counts) + chunk for chunk in rest))
            texts = expanded
        ids = [self.encode(t) for t in texts]
        width = max((len(x) for x in ids), default=0)
        input_ids, mask = [], []
        for x in ids:
            pad = [self.pad_id] * (width - len(x))
            input_ids.append(pad + x if padding_side == "left" else x + pad)
            ones, zeros = [1] * len(x), [0] * len(pad)
            mask.append(zeros + ones if padding_side == "left" else ones + zeros)
        if return_tensors == "pt":
            input_ids, mask = torch.tensor(input_ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        elif return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values, "image_grid_thw": grid}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self.decode(x, skip_special_tokens) for x in ids]

    def save_pretrained(self, out_dir) -> None:
        """Write tokenizer, preprocessor config and chat template; source files are copied verbatim."""
        os.makedirs(out_dir, exist_ok=True)
        src = self.source_dir
        same = src is not None and os.path.abspath(src) == os.path.abspath(out_dir)
        if src is not None and not same:
            for name in PROCESSOR_FILES:
                if os.path.isfile(p := os.path.join(src, name)):
                    shutil.copyfile(p, os.path.join(out_dir, name))
        if not os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
            self.tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
        if not os.path.isfile(os.path.join(out_dir, "tokenizer_config.json")):
            cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "bos_token": None, "unk_token": None, "model_max_length": 32768}
            if self.chat_template:
                cfg["chat_template"] = self.chat_template
            with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)
        # Always rewritten: pixel limits may have been overridden at load time. Unknown source keys are kept.
        pp_path = os.path.join(out_dir, "preprocessor_config.json")
        pp = _read_json(pp_path) if os.path.isfile(pp_path) else {}
        pp.update(self.image_processor.to_dict())
        with open(pp_path, "w", encoding="utf-8") as f:
            json.dump(pp, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# --- Conversations, datasets, batching (SFT) ---
# Records in the LLaVA/VHM form, a JSON list or JSONL:
#   {"id"?, "image": path | [paths], "conversations": [{"from": "human"|"user", "value": "<image>\n..."},
#    {"from": "gpt"|"assistant", "value": "..."}, ...], "task"?: name}
# ----------------------------------------------------------------------------------------------------------------
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# A placeholder takes one newline on each side with it: "<image>\nQ" becomes <|vision_start|>...<|vision_end|>Q,
# exactly what apply_chat_template writes for [image, text] content at inference.
_PLACEHOLDER_RE = re.compile(r"\n?<image>\n?")
_TASK_TAG_RE = re.compile(r"\s*\{([A-Za-z][\w-]*)\}")  # VHM's {CLS}, {VQA}, {VG}, ... at the start of a question
REASONING_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <reasoning> </reasoning> and <answer> </answer> tags, "
    "respectively, i.e., <reasoning> reasoning process here </reasoning><answer> answer here </answer>"
)


class DataError(ValueError):
    """Bad input data; the message names the file and the record (or line)."""


def read_records(path, skip_bad: bool = False, bad: list | None = None) -> list[tuple[dict, str]]:
    """[(record, where)] of a JSON list or JSONL file; `where` names the file, record index and JSONL line.

    Malformed JSON raises DataError naming the line; with skip_bad a malformed JSONL line is skipped and its
    message appended to `bad` (a JSON list cannot be read past an error)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    items = []
    if text.lstrip().startswith("["):
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        items = [(r, f"{path}: record {i}") for i, r in enumerate(recs)]
    else:
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path}: line {ln}: malformed JSON at column {e.colno}: {e.msg}"
                if not skip_bad:
                    raise DataError(msg + " (--skip-bad skips bad lines)") from None
                if bad is not None:
                    bad.append(msg)
                continue
            items.append((rec, f"{path}: record {len(items)} (line {ln})"))
    for rec, where in items:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return items


def conversation_messages(record: dict, where: str = "record") -> tuple[list[dict], list[str]]:
    """(messages in Processor.apply_chat_template's form, image paths as written) of one record.

    User/system turns become content lists of {"type": "image"} and {"type": "text"} parts, an image where its
    `<image>` placeholder stands, or all images at the start of the first user turn when there is none."""
    convs = record.get("conversations", record.get("messages"))
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: no 'conversations' list")
    images = record.get("image", record.get("images"))
    images = [] if images in (None, "") else [images] if isinstance(images, str) else list(images)
    turns = []
    for j, t in enumerate(convs):
        role = ROLES.get(str(t.get("from", t.get("role", ""))).lower()) if isinstance(t, dict) else None
        text = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if role is None or not isinstance(text, str):
            raise DataError(f"{where}: turn {j} needs 'from' (human/user, gpt/assistant or system) and a text 'value'")
        if role == "system" and j > 0:
            raise DataError(f"{where}: turn {j}: a system turn may only come first")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise DataError(f"{where}: turn {j}: an assistant turn cannot hold an {IMAGE_PLACEHOLDER}")
        turns.append([role, text])
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no assistant (gpt) turn, so nothing to learn: record refused")
    n_marks = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if n_marks == 0 and images:
        first_user = next((t for t in turns if t[0] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: images but no user turn to put them in")
        first_user[1] = IMAGE_PLACEHOLDER * len(images) + first_user[1]
    elif n_marks != len(images):
        raise DataError(f"{where}: {n_marks} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    messages = []
    for role, text in turns:
        if role == "assistant":
            messages.append({"role": role, "content": text})
            continue
        parts = []
        for k, chunk in enumerate(_PLACEHOLDER_RE.split(text)):
            if k:
                parts.append({"type": "image"})
            if chunk:
                parts.append({"type": "text", "text": chunk})
        messages.append({"role": role, "content": parts})
    return messages, [str(p) for p in images]


def render_conversation(proc: "Processor", messages, system_prompt: str | None = None):
    """(text, spans): the chat text exactly as proc.apply_chat_template writes it, and the character spans
    that are learned: each assistant turn's text and its <|im_end|> (not the newline after it)."""
    if messages and messages[0]["role"] != "system":
        system = proc.default_system if system_prompt is None else system_prompt
        messages = [{"role": "system", "content": system}] + list(messages)
    text = proc.apply_chat_template(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            # The template is prefix-stable: the text before a turn is the generation prompt of the turns before.
            start = len(proc.apply_chat_template(messages[:i], add_generation_prompt=True))
            end = start + len(m["content"]) + len("<|im_end|>")
            assert text[start:end] == m["content"] + "<|im_end|>", "chat template is not prefix-stable"
            spans.append((start, end))
    return text, spans


def tokenize_conversation(proc: "Processor", messages, system_prompt: str | None = None):
    """(ids, learn): int32 token ids of the chat with one <|image_pad|> per image, and a bool mask of the
    tokens that are learned. The whole text is tokenised at once, so ids are what inference sees."""
    text, spans = render_conversation(proc, messages, system_prompt)
    enc = proc.tokenizer.encode(text, add_special_tokens=False)
    starts = np.array([o[0] for o in enc.offsets], dtype=np.int64)
    learn = np.zeros(len(starts), dtype=bool)
    for a, b in spans:
        learn |= (starts >= a) & (starts < b)
    return np.asarray(enc.ids, dtype=np.int32), learn


def task_of(record: dict, messages) -> str:
    """`task` if the record has one, else the VHM tag that opens the first question ({VG} -> "VG"), else "other"."""
    if record.get("task"):
        return str(record["task"])
    for m in messages:
        if m["role"] == "user":
            first = next((p["text"] for p in m["content"] if p.get("type") == "text"), "")
            tag = _TASK_TAG_RE.match(first)
            return tag.group(1) if tag else "other"
    return "other"


@dataclass
class SampleInfo:
    """What the scan learned about one usable record; pixels are read only when the sample is used."""
    ids: np.ndarray  # int32, one <|image_pad|> per image
    learn: np.ndarray  # bool, per id
    images: list  # resolved paths
    image_tokens: list  # merged tokens per image
    task: str
    length: int  # tokens after image expansion and truncation
    n_labels: int
    where: str


def _image_size(path):
    from PIL import Image
    with Image.open(path) as im:  # reads the header only
        return im.size


class ConversationDataset(torch.utils.data.Dataset):
    """Conversation records, scanned once up front: token ids, labels, image sizes (headers only) and lengths.

    The scan drops what cannot be trained on and counts it in `stats`: records that fail (missing or unreadable
    image, bad conversation; an error naming file and record unless skip_bad), and samples longer than max_len
    whose cut would fall in or before an image (an image is never cut), or that keep no label after the cut.
    Items are dicts of input_ids, labels (IGNORE_INDEX where not learned), pixel_values, image_grid_thw."""

    def __init__(self, files, proc: "Processor", image_root=None, max_len: int = 4096,
                 system_prompt: str | None = None, skip_bad: bool = False):
        from concurrent.futures import ThreadPoolExecutor
        self.proc, self.max_len = proc, max_len
        self.stats = {"records": 0, "bad": 0, "too_long_image": 0, "too_long_no_labels": 0, "truncated": 0}
        self.bad_examples = []
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        pending = []  # (ids, learn, paths, task, where)
        for path in files:
            root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
            for rec, where in read_records(path, skip_bad, self.bad_examples):
                self.stats["records"] += 1
                try:
                    messages, images = conversation_messages(rec, where)
                    paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in images]
                    for p in paths:
                        if not os.path.isfile(p):
                            raise DataError(f"{where}{_rec_id(rec)}: image file not found: {p}")
                    ids, learn = tokenize_conversation(proc, messages, system_prompt)
                except DataError as e:
                    self._bad(e, skip_bad)
                    continue
                pending.append((ids, learn, paths, task_of(rec, messages), where + _rec_id(rec)))
        # Image headers from many files: threads hide the file-system latency.
        all_paths = sorted({p for x in pending for p in x[2]})
        with ThreadPoolExecutor(16) as pool:
            sizes = dict(zip(all_paths, pool.map(_safe_image_size, all_paths)))
        self.samples = []
        for ids, learn, paths, task, where in pending:
            try:
                for p in paths:
                    if isinstance(sizes[p], Exception):
                        raise DataError(f"{where}: cannot read image file {p}: {sizes[p]}")
                counts = [proc.image_processor.num_image_tokens(h, w) for w, h in (sizes[p] for p in paths)]
            except (DataError, ValueError) as e:
                self._bad(e, skip_bad)
                continue
            info = self._fit(ids, learn, paths, counts, task, where)
            if info is not None:
                self.samples.append(info)
        self.stats["bad"] = len(self.bad_examples)  # malformed JSONL lines and refused records
        if not self.samples:
            raise DataError(f"no usable samples in {', '.join(map(str, files))}: {self.stats}")
        self.tasks = [s.task for s in self.samples]
        self.lengths = [s.length for s in self.samples]

    def _bad(self, err, skip_bad):
        if not skip_bad:
            raise DataError(f"{err} (--skip-bad skips and counts such records)") from None
        self.bad_examples.append(str(err))

    def _fit(self, ids, learn, paths, counts, task, where):
        """SampleInfo after the max_len rule, or None (counted) when the sample cannot be kept."""
        img_pos = np.flatnonzero(ids == self.proc.image_token_id)
        full = len(ids) + sum(counts) - len(counts)
        length = full
        if full > self.max_len:
            # The last image's <|vision_end|> must stay: expanded index of it = its pad index + growth before it + 1.
            if len(img_pos) and img_pos[-1] + sum(counts) - len(counts) + 1 >= self.max_len:
                self.stats["too_long_image"] += 1
                return None
            length = self.max_len
        n_labels = int(learn[:length - (full - len(ids))].sum()) if length < full else int(learn.sum())
        if n_labels == 0:
            self.stats["too_long_no_labels"] += 1
            return None
        self.stats["truncated"] += length < full
        return SampleInfo(ids, learn, paths, counts, task, length, n_labels, where)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        pixel_values = grid = None
        reps = np.ones(len(s.ids), dtype=np.int64)
        if s.images:
            try:
                pixel_values, grid = self.proc.image_processor(s.images)
            except (OSError, ValueError) as e:
                raise DataError(f"{s.where}: {e}") from e
            counts = (grid.prod(-1) // self.proc.image_processor.merge_size ** 2).tolist()
            if counts != s.image_tokens:
                raise DataError(f"{s.where}: images changed since the scan ({counts} tokens, was {s.image_tokens})")
            reps[s.ids == self.proc.image_token_id] = counts
        ids = np.repeat(s.ids, reps)[:s.length].astype(np.int64)
        learn = np.repeat(s.learn, reps)[:s.length]
        labels = np.where(learn, ids, IGNORE_INDEX)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "pixel_values": pixel_values, "image_grid_thw": grid}


def _rec_id(rec):
    return f" (id {rec['id']})" if isinstance(rec, dict) and "id" in rec else ""


def _safe_image_size(path):
    try:
        return _image_size(path)
    except Exception as e:  # reported per record by the caller
        return e


def balance_factors(tasks, max_factor: float = 5.0) -> dict:
    """Replication per task and epoch: each task grows toward the largest one's count, at most max_factor times."""
    counts = {t: tasks.count(t) for t in sorted(set(tasks))}
    top = max(counts.values())
    return {t: min(float(max_factor), top / c) for t, c in counts.items()}


def balanced_counts(tasks, factors) -> dict:
    """Samples per task in one balanced epoch (what epoch_order yields)."""
    return {t: int(f) * tasks.count(t) + round((f - int(f)) * tasks.count(t)) for t, f in factors.items()}


def epoch_order(n_or_tasks, epoch: int, seed: int, factors: dict | None = None) -> list[int]:
    """Sample indices of one epoch, shuffled by (seed, epoch) only: every rank and every restart agree.

    With factors (balance_factors), a task's samples appear int(f) times plus a random fraction f - int(f) of them."""
    rng = np.random.default_rng([seed, epoch])
    if factors is None:
        n = n_or_tasks if isinstance(n_or_tasks, int) else len(n_or_tasks)
        return rng.permutation(n).tolist()
    tasks = np.asarray(n_or_tasks)
    picks = []
    for t, f in sorted(factors.items()):
        idx = np.flatnonzero(tasks == t)
        picks += [idx] * int(f)
        picks.append(rng.choice(idx, round((f - int(f)) * len(idx)), replace=False))
    return rng.permutation(np.concatenate(picks)).tolist()


def rank_steps(order, global_batch: int, micro_batch: int, rank: int = 0, world: int = 1, lengths=None):
    """Optimizer steps of an epoch for one rank: steps[s] = this rank's micro-batches (lists of sample indices).

    Global batch s is order[s*G:(s+1)*G] whatever the world size (a partial last one is dropped); rank r takes
    the r-th of `world` equal slices. Sorting a slice by length before cutting micro-batches cuts padding and
    does not change the loss (every sample of the global batch counts the same)."""
    per_rank, rem = divmod(global_batch, world)
    if rem or per_rank % micro_batch:
        raise ValueError(f"global batch {global_batch} must split into {world} ranks x micro-batches of {micro_batch}")
    steps = []
    for s in range(len(order) // global_batch):
        share = list(order[s * global_batch + rank * per_rank: s * global_batch + (rank + 1) * per_rank])
        if lengths is not None:
            share.sort(key=lambda i: -lengths[i])
        steps.append([share[k:k + micro_batch] for k in range(0, per_rank, micro_batch)])
    return steps


def pack_rows(lengths, capacity: int) -> list[list[int]]:
    """Positions of `lengths` grouped into rows of at most `capacity` tokens so that the batch (rows x longest
    row) is smallest; ties go to more, shorter rows, as a packed row attends densely under its mask. For each
    row count, longest first, each sample goes into the least-filled row. One row per sample is never beaten, so
    packing never pads more than padding does."""
    if max(lengths) > capacity:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a packed row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = None
    for k in range(max(1, math.ceil(sum(lengths) / capacity)), len(lengths) + 1):
        rows, load = [[] for _ in range(k)], [0] * k
        for i in order:
            r = min(range(k), key=load.__getitem__)
            if load[r] + lengths[i] > capacity:
                break
            rows[r].append(i)
            load[r] += lengths[i]
        else:
            if best is None or k * max(load) <= best[0]:
                best = (k * max(load), rows)
    return best[1]


def collate(samples, pad_id: int, pack_len: int | None = None) -> dict:
    """One micro-batch of dataset items as right-padded rows, attention_mask 1 on tokens and 0 on padding; or,
    with pack_len, samples packed into rows of at most pack_len tokens, attention_mask numbering the samples of
    a row 1, 2, ... (the model keeps attention and M-RoPE positions inside each). Images follow the row-major
    order of their tokens; each sample's first label is dropped, as nothing before it in its row predicts it."""
    rows = pack_rows([len(s["input_ids"]) for s in samples], pack_len) if pack_len else [[i] for i in
                                                                                          range(len(samples))]
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pixels, grids = [], []
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row, 1):
            s = samples[i]
            n = len(s["input_ids"])
            ids[r, at:at + n] = s["input_ids"]
            labels[r, at:at + n] = s["labels"]
            labels[r, at] = IGNORE_INDEX
            mask[r, at:at + n] = seg
            at += n
            if s["pixel_values"] is not None:
                pixels.append(s["pixel_values"])
                grids.append(s["image_grid_thw"])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.cat(pixels) if pixels else None,
            "image_grid_thw": torch.cat(grids) if grids else None}


# --- `python data.py think`: VHM-Instruct-Think from conversations, through any OpenAI-compatible endpoint ---
THINK_PROMPT = (
    "You are given a remote sensing image, a question about it and the correct answer. Explain step by step how "
    "the answer follows from what can be seen in the image: name the relevant objects, their positions, counts, "
    "shapes and context, as an analyst looking at the image would. Reason as if you were working the answer out "
    "yourself; do not say that the answer was given to you. Write the reasoning inside <reasoning> </reasoning>, "
    "then the answer inside <answer> </answer>, copied exactly as given (boxes keep their coordinates). Output "
    "nothing else."
)
_THINK_RE = re.compile(r"\s*<reasoning>(.*?)</reasoning>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def think_pairs(record: dict, where: str) -> list[tuple[int, str, str]]:
    """(turn index, question text, original answer) for each assistant turn of a record."""
    convs = record.get("conversations")
    conversation_messages(record, where)  # the same checks as training: roles, placeholders, an assistant turn
    pairs, question = [], ""
    for j, t in enumerate(convs):
        role = ROLES[str(t.get("from", t.get("role"))).lower()]
        text = t.get("value", t.get("content"))
        if role == "user":
            question = _PLACEHOLDER_RE.sub(" ", text).strip()
        elif role == "assistant":
            pairs.append((j, question, text))
    return pairs


def _image_data_url(path, max_side: int) -> str:
    import base64
    import io
    img = load_image(path)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _call_with_retries(client, request: dict, retries: int, backoff: float):
    """client.chat.completions.create, retried with exponential backoff (or the server's Retry-After) on 429,
    5xx, timeouts and dropped connections; other errors (400, 401, ...) are final at once."""
    import openai
    for attempt in range(retries + 1):
        try:
            return client.chat.completions.create(**request)
        except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                openai.APIConnectionError) as e:
            if attempt == retries:
                raise
            delay = backoff * 2 ** attempt * (1 + random.random())
            after = getattr(getattr(e, "response", None), "headers", {}).get("retry-after")
            try:
                delay = max(delay, min(float(after), 60.0)) if after is not None else delay
            except ValueError:
                pass
            time.sleep(delay)


def think_one(client, record: dict, where: str, image_root: str, args) -> dict:
    """Rewrite every assistant turn of one record as <reasoning>...</reasoning><answer>original</answer>.

    Returns {"status": "done" | "rejected" | "failed", "record" | "reason", "usage": [prompt, completion]}."""
    from rewards import normalize_answer
    usage = [0, 0]
    try:
        pairs = think_pairs(record, where)
        images = record.get("image", record.get("images")) or []
        images = [images] if isinstance(images, str) else images
        urls = [_image_data_url(os.path.join(image_root, p), args.image_max_side) for p in images]
    except (DataError, OSError, ValueError) as e:
        return {"status": "failed", "reason": str(e), "usage": usage}
    out = json.loads(json.dumps(record))
    for j, question, answer in pairs:
        content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        content.append({"type": "text", "text": f"Question: {question}\nCorrect answer: {answer}"})
        request = {"model": args.model, "messages": [{"role": "system", "content": THINK_PROMPT},
                                                     {"role": "user", "content": content}],
                   "temperature": args.temperature, "max_tokens": args.max_tokens}
        last = None
        for _ in range(args.attempts):
            try:
                resp = _call_with_retries(client, request, args.retries, args.backoff)
            except Exception as e:  # noqa: BLE001 - every API failure is reported per record, never raised
                return {"status": "failed", "reason": f"turn {j}: {type(e).__name__}: {e}", "usage": usage}
            if resp.usage is not None:
                usage[0] += resp.usage.prompt_tokens or 0
                usage[1] += resp.usage.completion_tokens or 0
            last = (resp.choices[0].message.content or "") if resp.choices else ""
            m = _THINK_RE.fullmatch(last)
            if m and m.group(1).strip() and normalize_answer(m.group(2)) == normalize_answer(answer):
                # the original answer verbatim: the label the model learns stays exactly the dataset's
                reasoning = m.group(1).strip()
                out["conversations"][j]["value"] = f"<reasoning>{reasoning}</reasoning><answer>{answer}</answer>"
                break
        else:
            return {"status": "rejected", "usage": usage, "last_output": last,
                    "reason": f"turn {j}: after {args.attempts} attempts the output is not <reasoning>..</reasoning>"
                              f"<answer>..</answer> with the original answer {answer!r}"}
    return {"status": "done", "record": out, "usage": usage}


def _done_ids(path) -> set:
    """Ids already written to a JSONL output; a half-written last line (from a kill) is cut off first."""
    if not os.path.isfile(path):
        return set()
    with open(path, "rb+") as f:
        data_ = f.read()
        if data_ and not data_.endswith(b"\n"):
            f.truncate(data_.rfind(b"\n") + 1)
            data_ = data_[:data_.rfind(b"\n") + 1]
    return {json.loads(line)["id"] for line in data_.decode("utf-8").splitlines() if line.strip()}


def add_think_args(p):
    p.add_argument("--data", required=True, action="append", help="conversation file (JSON list or JSONL), repeatable")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the data "
                                                      "file's folder)")
    p.add_argument("--out", required=True, help="output JSONL; OUT minus .jsonl + .rejected.jsonl / .failed.jsonl")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OpenAI's)")
    p.add_argument("--model", default="gpt-4.1-mini")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=5, help="retries of a request on 429/5xx/timeout")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry")
    p.add_argument("--attempts", type=int, default=3, help="tries per turn before an answer that disagrees "
                                                           "with the original is rejected")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--image-max-side", type=int, default=1024, help="images are sent downscaled to this side")
    p.add_argument("--limit", type=int, default=None, help="process at most this many new records")


def run_think(args) -> dict:
    """Write reasoning answers (VHM-Instruct-Think) for conversation records with an OpenAI-compatible model."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    import openai  # only this command needs it
    stem = args.out[:-len(".jsonl")] if args.out.endswith(".jsonl") else args.out
    rejected_path, failed_path = stem + ".rejected.jsonl", stem + ".failed.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # Resumable: done and rejected ids are final; failed ones (transient errors) are tried again.
    skip = _done_ids(args.out) | _done_ids(rejected_path)
    todo = []
    for path in args.data:
        root = args.image_root if args.image_root is not None else os.path.dirname(os.path.abspath(path))
        for k, (rec, where) in enumerate(read_records(path)):
            rid = rec.get("id", f"{os.path.basename(path)}:{k}")
            if rid not in skip:
                todo.append((rid, rec, where, root))
    todo = todo[:args.limit] if args.limit is not None else todo
    key = os.environ.get("OPENAI_API_KEY") or ("EMPTY" if args.base_url else None)
    if key is None:
        raise SystemExit("set OPENAI_API_KEY (or give --base-url for an endpoint that needs no key)")
    client = openai.OpenAI(base_url=args.base_url, api_key=key, timeout=args.timeout, max_retries=0)
    summary = {"skipped_done": len(skip), "done": 0, "rejected": 0, "failed": 0, "prompt_tokens": 0,
               "completion_tokens": 0}
    failed = []
    with open(args.out, "a", encoding="utf-8") as out, open(rejected_path, "a", encoding="utf-8") as rej, \
            ThreadPoolExecutor(max(1, args.concurrency)) as pool:
        futures = {pool.submit(think_one, client, rec, where, root, args): rid for rid, rec, where, root in todo}
        try:
            for fut in as_completed(futures):
                rid, res = futures[fut], fut.result()
                summary[res["status"]] += 1
                summary["prompt_tokens"] += res["usage"][0]
                summary["completion_tokens"] += res["usage"][1]
                if res["status"] == "done":
                    out.write(json.dumps({**res["record"], "id": rid}, ensure_ascii=False) + "\n")
                    out.flush()  # a whole line at a time: a kill loses at most the record in flight
                elif res["status"] == "rejected":
                    rej.write(json.dumps({"id": rid, "reason": res["reason"], "last_output": res["last_output"]},
                                         ensure_ascii=False) + "\n")
                    rej.flush()
                else:
                    failed.append({"id": rid, "reason": res["reason"]})
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            print("interrupted: finished records are saved; run the same command again to resume", file=sys.stderr)
            raise
    with open(failed_path, "w", encoding="utf-8") as f:  # this run's failures; the next run retries them
        f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in failed)
    summary["total_tokens"] = summary["prompt_tokens"] + summary["completion_tokens"]
    print(json.dumps(summary))
    for x in failed[:5]:
        print(f"failed {x['id']}: {x['reason']}", file=sys.stderr)
    return summary


# --- Synthetic remote-sensing world (the embedded default) ---
# A scene is drawn as facts first (class, land-cover layout, objects with kind, colour and pixel box) and
# rendered second. Captions, questions, reasoning and ground truth are all written from the same facts, so
# text and pixels cannot disagree. `python data.py synth` writes every stage's split, `python data.py tiny`
# a tiny random Qwen2-VL whose tokenizer is trained on this world's text.

# Qwen2-VL-Instruct's chat template (a data file of the checkpoint), written into the tiny checkpoints.
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
# Training prompt around a benchmark's bare question, by task type: a VHM tag first, then a short answer
# instruction. Evaluation files keep the bare question; evaluate.py wraps it with this same wording.
TASK_PROMPTS = {"cls": "{CLS} {q}\nAnswer with the name of one scene class.",
                "vqa": "{VQA} {q}\nAnswer with a single word or phrase.", "bbox": "{VG} {q}",
                "mcq": "{q}\nAnswer with the letter of the correct option.", "open": "{q}"}
SCENE_CLASSES = ("airport", "desert", "farmland", "forest", "harbor", "industrial", "parking lot", "residential")
URBAN = frozenset({"airport", "harbor", "industrial", "parking lot", "residential"})
OBJECT_KINDS = ("building", "ship", "plane", "storage tank", "vehicle")
COLOURS = {"white": (235, 235, 228), "grey": (128, 128, 134), "red": (192, 44, 38), "blue": (42, 82, 196),
           "yellow": (228, 196, 48), "black": (28, 28, 32)}
# kind: (colours, long side in px, short/long side ratio)
KINDS = {"building": (("red", "grey", "white", "blue"), (16, 34), (0.6, 1.0)),
         "ship": (("white", "grey", "red"), (26, 44), (0.28, 0.38)), "plane": (("white", "grey"), (26, 40), (1, 1)),
         "storage tank": (("white", "grey"), (14, 30), (1, 1)), "vehicle": (tuple(COLOURS), (9, 14), (0.45, 0.55))}
# Per scene class, per object kind: (min, max) count. Few kinds per class, so objects are clues to the class.
SCENE_OBJECTS = {
    "airport": {"plane": (1, 4), "vehicle": (0, 3)}, "desert": {"vehicle": (0, 2)},
    "farmland": {"building": (0, 2), "vehicle": (0, 1)}, "forest": {"building": (0, 1)},
    "harbor": {"ship": (2, 6), "storage tank": (0, 3)},
    "industrial": {"storage tank": (3, 7), "building": (1, 3), "vehicle": (0, 2)},
    "parking lot": {"vehicle": (8, 18), "building": (0, 1)}, "residential": {"building": (5, 10), "vehicle": (0, 4)},
}
# Land cover as a noun phrase; {land}, {dir}, {n} come from the scene layout.
_COVER = {"airport": "grass around a {dir} runway", "desert": "sand dunes over the whole area",
          "farmland": "crop fields in {n} plots", "forest": "dense trees over the whole area",
          "harbor": "water over most of the area and land along the {land} edge", "industrial": "bare concrete ground",
          "parking lot": "asphalt with painted parking lines", "residential": "houses along a grid of streets"}
# (w, h): multiples of 28 within 28*28*64 pixels, so a tiny model's processor sees them whole, unresized.
SYNTH_SIZES = ((224, 224), (224, 168), (168, 224), (196, 196))
# Each split draws from its own seed (seed*1000 + index): no scene is shared between splits.
SYNTH_SPLITS = {"pretrain": 0, "sft": 1, "grpo": 2, "cls_synth": 3, "vqa_synth": 4, "vg_synth": 5, "mcq_synth": 6,
                "example": 8, "corpus": 9}
# Unbalanced on purpose (VHM-Instruct is): --balance in SFT has something to fix. GRPO leans on grounding.
SFT_TASKS = {"cls": 0.30, "presence": 0.22, "count": 0.14, "vg": 0.12, "comparison": 0.08, "mcq": 0.08,
             "rural_urban": 0.06}
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
    """An object of `kind` inside `region`, 3 px clear of `taken`; None when 30 tries find no room."""
    colours, (lo, hi), aspect = KINDS[kind]
    long = int(rng.integers(lo, hi + 1))
    short = max(4, round(long * rng.uniform(*aspect)))
    vertical = bool(rng.integers(2))
    bw, bh = (short, long) if vertical else (long, short)
    colour = colours[int(rng.integers(len(colours)))]
    x0, y0, x1, y1 = region
    if x1 - x0 < bw + 6 or y1 - y0 < bh + 6:
        return None
    for _ in range(30):
        x, y = int(rng.integers(x0 + 3, x1 - bw - 2)), int(rng.integers(y0 + 3, y1 - bh - 2))
        if all(x + bw + 3 <= o.box[0] or o.box[2] + 3 <= x or y + bh + 3 <= o.box[1] or o.box[3] + 3 <= y
               for o in taken):
            return SynthObject(kind, colour, (x, y, x + bw, y + bh), vertical)
    return None


def sample_scene(rng, cls=None) -> SynthScene:
    """Scene facts: class (random unless given), image size, layout, objects placed without overlap."""
    cls = cls or SCENE_CLASSES[int(rng.integers(len(SCENE_CLASSES)))]
    w, h = SYNTH_SIZES[int(rng.integers(len(SYNTH_SIZES)))]
    layout, regions = {}, {}
    if cls == "harbor":
        layout = {"land": ("left", "right", "top", "bottom")[int(rng.integers(4))], "frac": rng.uniform(0.6, 0.75)}
        regions["ship"], regions["storage tank"] = _land_and_water(w, h, layout["land"], layout["frac"])
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
        elif o.kind == "storage tank":
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


def scene_caption(s: SynthScene) -> str:
    present = [k for k in OBJECT_KINDS if _counts(s)[k]]
    objs = ("The image contains " + _join([_kind_phrase(s, k) for k in present]) + "." if present
            else "There are no buildings, ships, planes, storage tanks or vehicles.")
    return f"An aerial view of {_article(s.cls)} {s.cls} scene. It shows {_cover(s)}. {objs}"


def _referable(s: SynthScene) -> list:
    """(phrase, object) for objects a short phrase picks out: the only one of its kind, or of its colour."""
    out = []
    for o in s.objects:
        same = [p for p in s.objects if p.kind == o.kind]
        if len(same) == 1:
            out.append((o.kind, o))
        elif sum(p.colour == o.colour for p in same) == 1:
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
        b = norm_box(s, o.box)
        t.update(type="bbox", q=f"Locate the {phrase} in this image.", answer=f"[[{b[0]}, {b[1]}, {b[2]}, {b[3]}]]",
                 box_px=list(o.box), reasoning=f"The {phrase} is at the {_where(s, o.box)} of the image. In 0-1000 "
                 f"coordinates it spans x from {b[0]} to {b[2]} and y from {b[1]} to {b[3]}.")
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
    tests check them against. pretrain has no tasks; an evaluation file draws among its own tasks, redrawing
    scenes that can pose none."""
    rng = _split_rng(seed, split)
    weights = {"sft": SFT_TASKS, "grpo": GRPO_TASKS, "pretrain": {}}.get(split)
    weights = {t: 1.0 for t in EVAL_TASKS[split][1]} if weights is None else weights
    while n > 0:
        s = sample_scene(rng)
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


def _human_gpt(q, a):
    return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]


def write_synth(out: str, seed: int = 0, n_pretrain: int = 1000, n_sft: int = 1000, questions_per_image: int = 2,
                n_grpo: int = 300, n_eval: int = 100) -> dict:
    """All splits under `out`: pretrain.json, sft.json, cot.json (sft.json's ids and questions, reasoned answers),
    grpo.jsonl, meta.json, images/<split>/*.png (record paths are relative to `out`), and eval/<file>.json with
    images in eval/<file>/ (RSRM layout: bare questions, grounding truth in pixels). Returns record counts."""
    for sub in ("images", "eval"):  # a rerun with other sizes must not leave stale images behind
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)

    def save(s, rel):
        os.makedirs(os.path.dirname(p := os.path.join(out, rel)), exist_ok=True)
        render_scene(s).save(p, format="PNG", compress_level=1)  # fast; PNG carries no timestamp: same bytes

    pre, sft, cot, grpo = [], [], [], []
    for i, (s, _) in enumerate(split_items(seed, "pretrain", n_pretrain)):
        save(s, img := f"images/pretrain/{i:05d}.png")
        pre.append({"id": f"pretrain_{i:05d}", "image": img,
                    "conversations": _human_gpt("Describe the image.", scene_caption(s))})
    for i, (s, tasks) in enumerate(split_items(seed, "sft", n_sft, questions_per_image)):
        save(s, img := f"images/sft/{i:05d}.png")
        for j, t in enumerate(tasks):
            rec = {"id": f"sft_{i:05d}_{j}", "image": img, "task": t["task"]}
            sft.append({**rec, "conversations": _human_gpt(t["question"], t["answer"])})
            cot.append({**rec, "conversations": _human_gpt(t["question"], cot_answer(t))})
    for i, (s, (t,)) in enumerate(split_items(seed, "grpo", n_grpo)):
        save(s, img := f"images/grpo/{i:05d}.png")
        grpo.append({"id": f"grpo_{i:05d}", "image": img, "question": t["question"], "answer": t["answer"],
                     "answer_type": t["answer_type"], "task": t["task"]})
    for name, recs in (("pretrain.json", pre), ("sft.json", sft), ("cot.json", cot)):
        _dump(os.path.join(out, name), recs)
    _dump(os.path.join(out, "grpo.jsonl"), grpo, lines=True)
    counts = {"pretrain": len(pre), "sft": len(sft), "cot": len(cot), "grpo": len(grpo)}
    for name in EVAL_TASKS:
        recs = []
        for i, (s, (t,)) in enumerate(split_items(seed, name, n_eval)):
            save(s, f"eval/{name}/{i:05d}.png")
            a = "[[{}, {}, {}, {}]]".format(*t["box_px"]) if t["type"] == "bbox" else t["answer"]
            recs.append({"image": f"{i:05d}.png", "conversations": _human_gpt(t["q"], a), "size": [s.w, s.h],
                         "type": [t.get("mcq_type", t["task"])]})
        _dump(os.path.join(out, "eval", name + ".json"), recs)
        counts[name] = len(recs)
    _dump(os.path.join(out, "meta.json"), {"seed": seed, "classes": list(SCENE_CLASSES), "records": counts,
                                           "eval_task_types": {n: v[0] for n, v in EVAL_TASKS.items()},
                                           "sft_tasks": {k: sum(r["task"] == k for r in sft) for k in SFT_TASKS}})
    return counts


# -- tiny model ---------------------------------------------------------------------------------------------------
def tiny_config(tok, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vision_depth=4, vision_dim=128,
                vision_heads=4):
    """A few-million-parameter Qwen2-VL with the 2B's shape ratios and the token ids of `tok`."""
    from model import Qwen2VLConfig, VisionConfig
    half = hidden // heads // 2
    hw = half * 3 // 8  # Qwen's 16/24/24 split of the rotary pairs, scaled to this head size
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2VLConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, mrope_section=[half - 2 * hw, hw, hw], max_position_embeddings=4096,
        vocab_size=-(-tok.get_vocab_size() // 64) * 64,  # spare rows, as the real checkpoint has
        tie_word_embeddings=True, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"]], pad_token_id=ids["<|endoftext|>"],
        # mlp_ratio an int: transformers' strict config refuses a float
        vision=VisionConfig(depth=vision_depth, embed_dim=vision_dim, num_heads=vision_heads, mlp_ratio=4,
                            hidden_size=hidden))
    cfg.validate("tiny config")
    return cfg


def init_weights(model, seed: int = 0, std: float = 0.02):
    """N(0, std) weight matrices, zero biases, unit norm scales, from one seeded generator (same seed, same bytes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # RMSNorm / LayerNorm scales
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def write_tiny(out: str, seed: int = 0, vocab_size: int = 1024, max_pixels: int = 28 * 28 * 64, **shape) -> int:
    """A tiny random Qwen2-VL checkpoint in HF layout, tokenizer and processor files included, plus example.png
    (a harbour scene). Returns the parameter count."""
    from model import Qwen2VL, save_checkpoint
    tok = train_tokenizer(synth_texts(seed), vocab_size)
    model = init_weights(Qwen2VL(tiny_config(tok, **shape)), seed)
    tok_cfg = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None, "errors": "replace",
               "add_prefix_space": False, "split_special_tokens": False, "clean_up_tokenization_spaces": False,
               "chat_template": QWEN2VL_CHAT_TEMPLATE}
    files = {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(tok_cfg, indent=2),
             "preprocessor_config.json": json.dumps(ImageProcessor(max_pixels=max_pixels).to_dict(), indent=2)}
    save_checkpoint(model.config, model.state_dict(), out, extra_files=files)
    render_scene(sample_scene(_split_rng(seed, "example"), "harbor")).save(os.path.join(out, "example.png"))
    return sum(p.numel() for p in model.parameters())


def _synth_args(p):
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    for flag, default, what in (("n-pretrain", 1000, "caption images"), ("n-sft", 1000, "SFT / CoT images"),
                                ("questions-per-image", 2, "SFT / CoT questions per image"),
                                ("n-grpo", 300, "GRPO prompts (one image each)"),
                                ("n-eval", 100, "records per evaluation file")):
        p.add_argument("--" + flag, type=int, default=default, help=f"{what} (default {default})")


def _synth_run(a):
    """Write the synthetic remote-sensing splits (pretrain, SFT, CoT, GRPO, evaluation)."""
    t0 = time.perf_counter()
    counts = write_synth(a.out, a.seed, a.n_pretrain, a.n_sft, a.questions_per_image, a.n_grpo, a.n_eval)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f" ({time.perf_counter() - t0:.1f} s)")


def _tiny_args(p):
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    for flag, default in (("seed", 0), ("vocab-size", 1024), ("hidden", 256), ("layers", 4), ("intermediate", 768),
                          ("vision-depth", 4), ("max-pixels", 28 * 28 * 64)):
        p.add_argument("--" + flag, type=int, default=default, help=f"default {default}")


def _tiny_run(a):
    """Write a tiny random Qwen2-VL checkpoint with a tokenizer trained on the synthetic world's text."""
    n = write_tiny(a.out, a.seed, a.vocab_size, a.max_pixels, hidden=a.hidden, layers=a.layers,
                   intermediate=a.intermediate, vision_depth=a.vision_depth)
    print(f"wrote {a.out}: tiny Qwen2-VL, {n / 1e6:.2f}M parameters")


# ----------------------------------------------------------------------------------------------------------------
# Command line: `python data.py COMMAND ...`. Each section registers its commands here as
# COMMANDS[name] = (add_arguments(parser), run(args)).
# ----------------------------------------------------------------------------------------------------------------
COMMANDS: dict = {}
COMMANDS["think"] = (add_think_args, run_think)
COMMANDS["synth"] = (_synth_args, _synth_run)
COMMANDS["tiny"] = (_tiny_args, _tiny_run)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="TinyRS data tools.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().split("\n")[0])
        add_arguments(p)
        p.set_defaults(_run=run)
    args = ap.parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    main()
