"""Data for TinyRS: image processor, tokenizer wrapper and chat template, conversations -> token ids and labels,
datasets, task balancing, batching and packing. A library: no command line, no project imports.

The synthetic world and tiny checkpoints are synth.py; reasoning answers written by an LLM are think.py."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch

# --- Image processor, tokenizer wrapper and chat template, following Qwen2-VL's released processor ---
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_TOKEN = "<|image_pad|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"  # what a generation prompt ends with
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


def image_data_url(image, max_side: int = 768) -> str:
    """A JPEG data URL of an image file or PIL image, its longest side at most `max_side`: how an image travels
    to an OpenAI-compatible model (the reasoning-caption writer, the GRPO judge). Errors name the file."""
    import base64
    import io
    img = load_image(image)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


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

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x frames x patch x patch."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

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
        return x.reshape(gh * gw, self.patch_dim), (1, gh, gw)

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


def tokenizer_config(chat_template: str | None = None) -> dict:
    """tokenizer_config.json for a tokenizer of Qwen2's kind: what transformers' AutoTokenizer needs to load it
    as Qwen2-VL's (special tokens, byte-level options), and the chat template when given."""
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None, "errors": "replace",
           "add_prefix_space": False, "split_special_tokens": False, "clean_up_tokenization_spaces": False}
    return cfg if chat_template is None else {**cfg, "chat_template": chat_template}


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

    def encode(self, text: str, offsets: bool = False):
        """Token ids of `text`, special tokens such as <|im_start|> recognised as single ids; with offsets, also
        each token's first character in `text`.

        The text is cut after every assistant header and the pieces encoded apart. Qwen2's tokenizer merges a
        line break that opens an answer with the header's own "\n" into one "\n\n" token; a generation prompt
        ends with the header, so the model never sees that token at inference and must not learn it in training.
        Cut this way, training ids and generation prompts agree token for token."""
        ids, starts, at = [], [], 0
        pieces = text.split(ASSISTANT_HEADER)
        for i, piece in enumerate(pieces):
            piece += ASSISTANT_HEADER if i < len(pieces) - 1 else ""
            enc = self.tokenizer.encode(piece, add_special_tokens=False)
            ids += enc.ids
            if offsets:
                starts += [at + o[0] for o in enc.offsets]
            at += len(piece)
        return (ids, starts) if offsets else ids

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
            with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(tokenizer_config(self.chat_template or None), f, indent=2, ensure_ascii=False)
        # Always rewritten: pixel limits may have been overridden at load time. Unknown source keys are kept.
        pp_path = os.path.join(out_dir, "preprocessor_config.json")
        pp = _read_json(pp_path) if os.path.isfile(pp_path) else {}
        pp.update(self.image_processor.to_dict())
        with open(pp_path, "w", encoding="utf-8") as f:
            json.dump(pp, f, indent=2)


# --- Conversations, datasets, batching (SFT) ---
# Records in the LLaVA/VHM form, a JSON list or JSONL:
#   {"id"?, "image": path | [paths], "conversations": [{"from": "human"|"user", "value": "<image>\n..."},
#    {"from": "gpt"|"assistant", "value": "..."}, ...], "task"?: name}
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


def record_turns(record: dict):
    """A record's turns: `conversations` (LLaVA, VHM, TinyRS), `conversation` (some RSRM/ScoreRS files) or
    `messages`."""
    for key in ("conversations", "conversation", "messages"):
        if key in record:
            return record[key]
    return None


def image_path(name: str, root: str, source_dataset: str | None = None) -> str:
    """Where a record's image file is. VHM's own JSON files keep each image in a folder named after its source
    dataset (`source_dataset`: ROOT/source_dataset/name); TinyRS's repackaged files give the path relative to
    ROOT, sub-folder included, and may keep the field. The first candidate that exists wins; none: an error
    listing where it looked."""
    if os.path.isabs(name):
        candidates = [name]
    else:
        candidates = ([os.path.join(root, str(source_dataset), name)] if source_dataset else []) + \
            [os.path.join(root, name)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError("image file not found: " + " (nor ".join(candidates) + ")" * (len(candidates) - 1))


def conversation_messages(record: dict, where: str = "record") -> tuple[list[dict], list[str]]:
    """(messages in Processor.apply_chat_template's form, image paths as written) of one record.

    User/system turns become content lists of {"type": "image"} and {"type": "text"} parts, an image where its
    `<image>` placeholder stands, or all images at the start of the first user turn when there is none."""
    convs = record_turns(record)
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
    tokens that are learned. Tokenised by Processor.encode, so the ids before each answer are exactly that
    turn's generation prompt, and each answer is learned as written, from its first character."""
    text, spans = render_conversation(proc, messages, system_prompt)
    ids, starts = proc.encode(text, offsets=True)  # each learned span starts where a piece starts
    starts = np.asarray(starts, dtype=np.int64)
    learn = np.zeros(len(starts), dtype=bool)
    for a, b in spans:
        learn |= (starts >= a) & (starts < b)
    return np.asarray(ids, dtype=np.int32), learn


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
    grids: list  # (1, h/14, w/14) patch grid per image, from its header
    task: str
    length: int  # tokens after image expansion and truncation
    n_labels: int
    where: str


class ConversationDataset(torch.utils.data.Dataset):
    """Conversation records, scanned once up front: token ids, labels, image sizes (headers only) and lengths.

    The scan drops what cannot be trained on and counts it in `stats`: records that fail (missing or unreadable
    image, bad conversation; an error naming file and record unless skip_bad), and samples longer than max_len
    whose cut would fall in or before an image (an image is never cut), or that keep no label after the cut.
    `stats["repeated"]` counts records that repeat an earlier one: a file that is already oversampled.
    Items are dicts of input_ids, labels (IGNORE_INDEX where not learned), pixel_values, image_grid_thw; with
    skip_bad, an image that fails to decode when its sample is used (its header read fine in the scan) gives
    the sample with blank pixels and no label, and the reason under "skipped": every rank still runs the same
    forward passes, and the sample adds nothing to the loss."""

    def __init__(self, files, proc: "Processor", image_root=None, max_len: int = 4096,
                 system_prompt: str | None = None, skip_bad: bool = False):
        from concurrent.futures import ThreadPoolExecutor
        self.proc, self.max_len, self.skip_bad = proc, max_len, skip_bad
        self.stats = {"records": 0, "bad": 0, "too_long_image": 0, "too_long_no_labels": 0, "truncated": 0,
                      "repeated": 0}
        self.bad_examples = []
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        pending, seen = [], set()  # pending: (ids, learn, paths, task, where)
        for path in files:
            root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
            for rec, where in read_records(path, skip_bad, self.bad_examples):
                self.stats["records"] += 1
                key = hash(json.dumps({k: v for k, v in rec.items() if k != "id"}, sort_keys=True))
                self.stats["repeated"] += key in seen
                seen.add(key)
                try:
                    messages, images = conversation_messages(rec, where)
                    try:
                        paths = [image_path(p, root, rec.get("source_dataset")) for p in images]
                    except FileNotFoundError as e:
                        raise DataError(f"{where}{_rec_id(rec)}: {e}") from None
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
                ip = proc.image_processor
                grids = [(1, h // ip.patch_size, w // ip.patch_size) for h, w in
                         (ip.target_size(h, w) for w, h in (sizes[p] for p in paths))]
            except (DataError, ValueError) as e:
                self._bad(e, skip_bad)
                continue
            info = self._fit(ids, learn, paths, grids, task, where)
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

    def _fit(self, ids, learn, paths, grids, task, where):
        """SampleInfo after the max_len rule, or None (counted) when the sample cannot be kept."""
        counts = self._tokens(grids)
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
        return SampleInfo(ids, learn, paths, grids, task, length, n_labels, where)

    def _tokens(self, grids) -> list[int]:
        return [t * h * w // self.proc.image_processor.merge_size ** 2 for t, h, w in grids]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        pixel_values = grid = None
        skipped = None
        reps = np.ones(len(s.ids), dtype=np.int64)
        if s.images:
            try:
                pixel_values, grid = self.proc.image_processor(s.images)
            except (OSError, ValueError) as e:
                if not self.skip_bad:
                    raise DataError(f"{s.where}: {e} (--skip-bad skips and counts such samples)") from e
                skipped = f"{s.where}: {e}"
                grid = torch.tensor(s.grids, dtype=torch.long)
                pixel_values = torch.zeros(int(grid.prod(-1).sum()), self.proc.image_processor.patch_dim)
            if grid.tolist() != [list(g) for g in s.grids]:
                raise DataError(f"{s.where}: images changed since the scan (patch grids {grid.tolist()}, were "
                                f"{[list(g) for g in s.grids]})")
            reps[s.ids == self.proc.image_token_id] = self._tokens(s.grids)
        ids = np.repeat(s.ids, reps)[:s.length].astype(np.int64)
        learn = np.repeat(s.learn, reps)[:s.length] & (skipped is None)
        labels = np.where(learn, ids, IGNORE_INDEX)
        item = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "pixel_values": pixel_values, "image_grid_thw": grid}
        if skipped:
            item["skipped"] = skipped
        return item


def _rec_id(rec):
    return f" (id {rec['id']})" if isinstance(rec, dict) and "id" in rec else ""


def _safe_image_size(path):
    """(width, height) from the file's header alone, or the exception, which the caller reports per record."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # noqa: BLE001 - any unreadable file is one bad record, never a crash
        return e


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
    order of their tokens; each sample's first label is dropped, as nothing before it in its row predicts it.
    "skipped": why samples of the batch were blanked (see ConversationDataset), for the log."""
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
            "image_grid_thw": torch.cat(grids) if grids else None,
            "skipped": [s["skipped"] for s in samples if "skipped" in s]}


# Training prompt around a benchmark's bare question, by task type: a VHM tag first, then a short answer
# instruction. Evaluation files keep the bare question; evaluate.py wraps it with this same wording.
TASK_PROMPTS = {"cls": "{CLS} {q}\nAnswer with the name of one scene class.",
                "vqa": "{VQA} {q}\nAnswer with a single word or phrase.", "bbox": "{VG} {q}",
                "mcq": "{q}\nAnswer with the letter of the correct option.", "open": "{q}"}
