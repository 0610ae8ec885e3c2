"""Tiny random Qwen2-VL checkpoints in the exact HF layout, built with transformers (the oracle) on the fly."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import synth  # noqa: E402

QWEN2VL_CHAT_TEMPLATE = synth.QWEN2VL_CHAT_TEMPLATE

CORPUS = [
    "You are a helpful assistant. Describe the image. What is in this aerial scene?",
    "A satellite image of a harbour with 3 ships, a runway with 2 planes and 12 storage tanks near the river.",
    "{CLS} Classify the scene. Answer: forest. {VQA} Is there a building? yes. no. {VG} Locate the plane [[120, 340, 560, 780]].",
    "The farmland lies north of the dense urban area; water covers the south-east corner (x1,y1),(x2,y2).",
]


def build_tokenizer():
    return synth.train_tokenizer(CORPUS * 4, vocab_size=512)


def tiny_config(tok, tie=False, layers=2, vision_depth=2, hidden=64, heads=4, kv_heads=2, rope_theta=10.0):
    """rope_theta 10 by default, the demo's tiny model's: the oracle then also checks that a theta other than
    the 2B's 1e6 is read from config.json and used."""
    from transformers import Qwen2VLConfig
    ids = {t: tok.token_to_id(t) for t in synth.SPECIAL_TOKENS}
    vocab = tok.get_vocab_size() + 3  # a few unused rows, as the real checkpoint has
    half = hidden // heads // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return Qwen2VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden + 16, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         rms_norm_eps=1e-6, rope_theta=rope_theta, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": section}, tie_word_embeddings=tie,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, embed_dim=32, num_heads=2, hidden_size=hidden, mlp_ratio=2,
                           in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )


def randomize_(model, seed=0):
    """Weights of O(1) activations: HF's 0.02-std init makes logits nearly flat and comparisons toothless."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] if p.ndim > 1 else p.shape[0]
                if p.ndim == 5:
                    fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


def write_tokenizer_files(tok, path, max_pixels=28 * 28 * 64):
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(data.tokenizer_config(QWEN2VL_CHAT_TEMPLATE), f, indent=2)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": 56 * 56, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}, f,
                  indent=2)


def make_checkpoint(path, tie=False, seed=0, **kw):
    """Save a random transformers Qwen2-VL (nested config, transformers' own writer) plus tokenizer files."""
    from transformers import Qwen2VLForConditionalGeneration
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = randomize_(Qwen2VLForConditionalGeneration(tiny_config(tok, tie=tie, **kw)), seed).eval()
    model.save_pretrained(path)
    write_tokenizer_files(tok, path)
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(path, transformers model) for an untied tiny checkpoint."""
    path = str(tmp_path_factory.mktemp("tiny_untied"))
    return path, make_checkpoint(path, tie=False)


@pytest.fixture(scope="session")
def tiny_tied_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_tied"))
    return path, make_checkpoint(path, tie=True, seed=1)
