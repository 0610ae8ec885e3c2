"""Data for TinyRS: image processor, tokenizer and chat template, conversations, datasets, synthetic RS data."""
from __future__ import annotations

import json
import math
import os
import shutil
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
