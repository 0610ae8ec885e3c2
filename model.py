"""Qwen2-VL in plain PyTorch: vision tower, patch merger, Qwen2 decoder with M-RoPE, KV cache, generation,
and loading/saving of Hugging Face checkpoints (safetensors only).

Module and parameter names follow the original checkpoint layout (`model.layers.0.self_attn.q_proj.weight`,
`visual.blocks.0.attn.qkv.weight`, ...), so a state dict maps onto a checkpoint with no renaming table.

    python model.py --model Qwen/Qwen2-VL-2B-Instruct --image scene.png "How many ships are there?"
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_chans: int = 3
    hidden_size: int = 1536  # merger output = the decoder's width
    rope_theta: float = 10000.0


@dataclass
class Qwen2VLConfig:
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])
    vocab_size: int = 151936
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: list = field(default_factory=lambda: [151645])
    pad_token_id: int | None = 151643
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Qwen2VLConfig":
        """Read the original flat layout and the newer nested (`text_config`) one."""
        model_type = d.get("model_type", "")
        if model_type != "qwen2_vl":
            archs = d.get("architectures") or []
            raise ValueError(f"{source}: model_type {model_type!r} (architectures {archs}) is not Qwen2-VL; this "
                             f"code implements Qwen2-VL only (Qwen2.5-VL and others differ in the vision tower).")
        text = dict(d)
        text.update(d.get("text_config") or {})  # nested values win: that is where newer exports keep them
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        vis = d.get("vision_config") or {}
        vrope = vis.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=vis.get("depth", 32), embed_dim=vis.get("embed_dim", 1280), num_heads=vis.get("num_heads", 16),
            mlp_ratio=vis.get("mlp_ratio", 4.0), patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            temporal_patch_size=vis.get("temporal_patch_size", 2), spatial_merge_size=vis.get("spatial_merge_size", 2),
            in_chans=vis.get("in_chans", vis.get("in_channels", 3)), hidden_size=vis.get("hidden_size", 1536),
            rope_theta=vrope.get("rope_theta", 10000.0))
        eos = text.get("eos_token_id", d.get("eos_token_id", 151645))
        cfg = cls(
            hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text.get("rope_theta", 1e6)),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])), vocab_size=text["vocab_size"],
            tie_word_embeddings=d.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            bos_token_id=text.get("bos_token_id", d.get("bos_token_id")),
            eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else [eos],
            pad_token_id=text.get("pad_token_id", d.get("pad_token_id")), vision=vision)
        cfg.validate(source)
        return cfg

    def validate(self, source="config"):
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size not divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads not divisible by num_key_value_heads")
        if sum(self.mrope_section) * 2 != self.head_dim:
            problems.append(f"mrope_section {self.mrope_section} does not sum to head_dim/2 = {self.head_dim // 2}")
        if self.vision.embed_dim % self.vision.num_heads:
            problems.append("vision embed_dim not divisible by num_heads")
        if problems:
            raise ValueError(f"{source}: inconsistent Qwen2-VL config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        """The original flat layout: the one Qwen2-VL-2B-Instruct ships and every transformers version reads."""
        v = self.vision
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
            "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "max_window_layers": self.num_hidden_layers,
            "use_sliding_window": False, "sliding_window": self.max_position_embeddings, "attention_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": True,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "vision_config": {"depth": v.depth, "embed_dim": v.embed_dim, "num_heads": v.num_heads,
                              "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio, "patch_size": v.patch_size, "hidden_act": "quick_gelu",
                              "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
                              "in_chans": v.in_chans, "hidden_size": v.hidden_size},
        }


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces

# Under inference mode (generate: evaluation, GRPO rollouts, the CLI) CPU fp32 matrix products run on oneDNN
# rather than the BLAS behind F.linear: on the CPU we measured (AMD EPYC, 2 cores), MKL reached ~20 GB/s on the
# one-row products of decoding and ~175 GFLOPS on prefill, oneDNN ~37 GB/s and ~400 GFLOPS on the same weights,
# with no copy or reordering of them. Plain forward passes (training, reference log-probs) keep F.linear, so a
# forward gives the same bits with and without grad. Set to False to compare.
ONEDNN_CPU_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x, weight, bias=None):
    """F.linear, through oneDNN for CPU fp32 under inference mode (see ONEDNN_CPU_LINEAR)."""
    if (ONEDNN_CPU_LINEAR and torch.is_inference_mode_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(weight) in (torch.Tensor, nn.Parameter)):  # not a DTensor shard
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose forward goes through `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def inverse_frequencies(dim: int, theta: float, device=None):
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 and cast back before the scale, as the checkpoints were trained.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Vision tower


class VisionAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x, cos, sin, lengths):
        n, dim = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, dim // self.heads).unbind(1)  # each [n, heads, hd]
        # Rotary in fp32, as in training; cos/sin are [n, 1, hd].
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = torch.empty_like(q)
        # Attention stays inside each image. Images of equal size run as one batch, so no dense
        # [all patches x all patches] mask is ever built.
        starts = [0] + torch.tensor(lengths).cumsum(0).tolist()
        by_len = {}
        for i, n_i in enumerate(lengths):
            by_len.setdefault(n_i, []).append(starts[i])
        for n_i, offs in by_len.items():
            idx = (torch.tensor(offs, device=x.device)[:, None] + torch.arange(n_i, device=x.device)).flatten()
            qs, ks, vs = (t[idx].view(len(offs), n_i, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs)
            out[idx] = o.transpose(1, 2).reshape(-1, self.heads, o.shape[-1])
        return self.proj(out.view(n, dim))


class VisionMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # QuickGELU


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.attn = VisionAttention(c.embed_dim, c.num_heads)
        self.mlp = VisionMLP(c.embed_dim, int(c.embed_dim * c.mlp_ratio))

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_chans, c.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, x):
        # The kernel covers the whole flattened patch, so the convolution is one matrix product.
        w = self.proj.weight
        return linear(x.to(w.dtype), w.view(w.shape[0], -1))


class PatchMerger(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.ln_q = nn.LayerNorm(c.embed_dim, eps=1e-6)
        width = c.embed_dim * c.spatial_merge_size ** 2
        self.mlp = nn.Sequential(Linear(width, width), nn.GELU(), Linear(width, c.hidden_size))

    def forward(self, x):
        # The processor emits the patches of each 2x2 merge group next to each other, so a view concatenates them.
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)
        self.grad_ckpt = False

    def rotary(self, grid_thw, device):
        """cos/sin [patches, 1, head_dim] of the 2-D rotary on each patch's (row, col), in merge-group order."""
        m = self.config.spatial_merge_size
        rows, cols = [], []
        for t, h, w in grid_thw.tolist():
            r = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            c = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            rows.append(r.permute(0, 2, 1, 3).flatten().repeat(t))
            cols.append(c.permute(0, 2, 1, 3).flatten().repeat(t))
        hd = self.config.embed_dim // self.config.num_heads
        inv = inverse_frequencies(hd // 2, self.config.rope_theta, device)
        ang = torch.cat([torch.cat(rows)[:, None] * inv, torch.cat(cols)[:, None] * inv], dim=-1)
        ang = torch.cat([ang, ang], dim=-1)[:, None, :]
        return ang.cos(), ang.sin()

    def forward(self, pixel_values, grid_thw):
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary(grid_thw, x.device)
        # One attention window per frame; a still image is one frame.
        lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        for blk in self.blocks:
            if self.grad_ckpt and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, cos, sin, lengths, use_reentrant=False)
            else:
                x = blk(x, cos, sin, lengths)
        return self.merger(x)


# ----------------------------------------------------------------------------------------------------------------
# Decoder


class KVCache:
    """Prompt keys/values stored once per prompt; generated ones per sample.

    With `group` samples per prompt, the prompt part is [B, kv_heads, P, hd] and is read by all of the prompt's
    samples, so G completions cost no copy of the prompt (image tokens included).

    A plain class on purpose, not a dataclass: wrappers that rebuild a layer's inputs (FSDP's input cast copies
    dataclasses and lists) pass it through untouched, so what the prefill stores is what decoding reads."""

    def __init__(self, prefix: list, prefix_valid, k: torch.Tensor, v: torch.Tensor, group: int = 1):
        self.prefix = prefix  # per layer (k, v) [B, KVH, P, hd]
        self.prefix_valid = prefix_valid  # [B, P] bool, False on padding
        self.k, self.v = k, v  # [L, B, KVH, G, N, hd]
        self.group = group
        self.n = 0  # generated positions written so far


class Attention(nn.Module):
    def __init__(self, c: Qwen2VLConfig):
        super().__init__()
        self.heads, self.kv_heads, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.heads * self.hd)
        self.k_proj = Linear(c.hidden_size, self.kv_heads * self.hd)
        self.v_proj = Linear(c.hidden_size, self.kv_heads * self.hd)
        self.o_proj = Linear(self.heads * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None and cache.prefix_valid is not None and len(cache.prefix) > layer:
            out = self._decode(q, k, v, cache, layer)
        else:
            if cache is not None:  # prefill: this is the prompt
                cache.prefix.append((k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _decode(self, q, k, v, cache: KVCache, layer):
        """New tokens against [prompt | generated], the prompt read once for all of a prompt's samples.

        Layout [B, kv_heads, G, queries, ...]: the query heads that share a kv head and the G samples that share
        a prompt fold into one matrix product with the prompt's keys (plain matmuls: einsum is slow here)."""
        BG, H, T, hd = q.shape
        G, n = cache.group, cache.n
        pk, pv = cache.prefix[layer]
        B, KVH = pk.shape[0], pk.shape[1]
        rep = H // KVH
        cache.k[layer, :, :, :, n:n + T] = k.reshape(B, G, KVH, T, hd).transpose(1, 2)
        cache.v[layer, :, :, :, n:n + T] = v.reshape(B, G, KVH, T, hd).transpose(1, 2)
        sk, sv = cache.k[layer, :, :, :, :n + T], cache.v[layer, :, :, :, :n + T]  # [B, KVH, G, n+T, hd]
        qg = q.reshape(B, G, KVH, rep * T, hd).transpose(1, 2) * (1.0 / math.sqrt(hd))  # [B, KVH, G, rep*T, hd]
        P = pk.shape[2]
        sp = (qg.reshape(B, KVH, G * rep * T, hd) @ pk.transpose(-1, -2)).view(B, KVH, G, rep * T, P)
        sp = sp.float().masked_fill(~cache.prefix_valid[:, None, None, None, :], float("-inf"))
        ss = (qg @ sk.transpose(-1, -2)).float()  # [B, KVH, G, rep*T, n+T]
        if T > 1:  # causal among the new tokens
            causal = torch.ones(T, n + T, dtype=torch.bool, device=q.device).tril(n)
            ss = ss.view(B, KVH, G, rep, T, n + T).masked_fill(~causal, float("-inf")).view_as(ss)
        p = torch.cat([sp, ss], dim=-1).softmax(-1).to(q.dtype)  # softmax in fp32
        out = (p[..., :P].reshape(B, KVH, G * rep * T, P) @ pv).view(B, KVH, G, rep * T, hd)
        out = out + p[..., P:] @ sv
        return out.transpose(1, 2).reshape(BG, H, T, hd)


class MLP(nn.Module):
    def __init__(self, c: Qwen2VLConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: Qwen2VLConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, c: Qwen2VLConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def mrope_cos_sin(position_ids, cfg: Qwen2VLConfig, dtype):
    """position_ids [3, B, T] -> cos, sin [B, 1, T, head_dim]: rotary pairs split 16/24/24 between t, h, w."""
    inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta, position_ids.device)
    ang = position_ids[..., None].float() * inv  # [3, B, T, hd/2]
    parts, start = [], 0
    for axis, n in enumerate(cfg.mrope_section):
        parts.append(ang[axis, ..., start:start + n])
        start += n
    ang = torch.cat(parts, dim=-1)
    ang = torch.cat([ang, ang], dim=-1)[:, None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def attention_mask_4d(segments):
    """[B, T] segment ids (0 = padding, equal ids attend to each other) -> [B, 1, T, T] bool, causal.

    A padding query may see itself only: it must see something, or softmax gives NaN."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    m = same & causal & (segments[:, None, :] > 0)
    m = m | torch.eye(T, dtype=torch.bool, device=segments.device)
    return m[:, None]


def rope_index(input_ids, attention_mask, image_grid_thw, cfg: Qwen2VLConfig):
    """M-RoPE position ids [3, B, T] and each row's next free position [B].

    Text tokens share one running index on all three axes; an image's tokens take (start, start+row, start+col)
    on its merged grid, and the text after it resumes at the image's largest index + 1. Padding (mask 0) is
    skipped, so left padding shifts nothing; in a packed row each segment (mask value) starts again at 0.
    Padding positions get 0."""
    B, T = input_ids.shape
    m = cfg.vision.spatial_merge_size
    pos = torch.zeros(3, B, T, dtype=torch.long)
    next_pos = torch.zeros(B, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    ids_all = input_ids.cpu()
    seg_all = attention_mask.cpu() if attention_mask is not None else torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        seg = seg_all[b]
        idx = torch.nonzero(seg > 0).flatten()
        if len(idx) == 0:
            continue
        # split the row's valid positions into runs of equal segment id
        cuts = torch.nonzero(seg[idx][1:] != seg[idx][:-1]).flatten() + 1
        for run in torch.tensor_split(idx, cuts.tolist()):
            ids = ids_all[b, run]
            is_img = (ids == cfg.image_token_id).tolist()
            out = torch.empty(3, len(run), dtype=torch.long)
            cur, i = 0, 0
            while i < len(run):
                if is_img[i]:
                    try:
                        t, h, w = next(grids)
                    except StopIteration:
                        raise ValueError("more images in input_ids than rows in image_grid_thw") from None
                    n = t * h * w // (m * m)
                    gh, gw = h // m, w // m
                    tt = torch.arange(t).view(t, 1, 1).expand(t, gh, gw).flatten()
                    hh = torch.arange(gh).view(1, gh, 1).expand(t, gh, gw).flatten()
                    ww = torch.arange(gw).view(1, 1, gw).expand(t, gh, gw).flatten()
                    out[:, i:i + n] = torch.stack([tt, hh, ww]) + cur
                    cur = cur + max(t, gh, gw)
                    i += n
                else:
                    j = i
                    while j < len(run) and not is_img[j]:
                        j += 1
                    out[:, i:j] = torch.arange(cur, cur + j - i)
                    cur += j - i
                    i = j
            pos[:, b, run] = out
            next_pos[b] = cur
    return pos.to(input_ids.device), next_pos.to(input_ids.device)


# ----------------------------------------------------------------------------------------------------------------
# The model


class Qwen2VL(nn.Module):
    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.model = TextModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_ckpt = False
        self.source_dir = None  # where tokenizer/preprocessor files come from when saving
        self.generation_eos = None  # eos ids from generation_config.json, if the checkpoint has one

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def set_grad_checkpointing(self, on=True):
        self.grad_ckpt = on
        self.visual.grad_ckpt = on

    # -- embedding of text and images ------------------------------------------------------------------------
    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, image_groups=1, sync_vision=False):
        """Token embeddings with each image's merged features at its <|image_pad|> tokens.

        image_groups=G: rows come in groups of G that share their images (G completions of one prompt);
        image_grid_thw lists every row's images, pixel_values only the first row's of each group, and the
        vision tower encodes each group's images once.
        sync_vision: without images, run the vision tower anyway, on a blank image of one merged token whose
        features are added with weight 0. Under FSDP every rank must run (and back-propagate through) the same
        units: a text-only batch on one rank while another has images would otherwise stall the collectives."""
        c = self.config
        x = self.model.embed_tokens(input_ids)
        is_img = input_ids == c.image_token_id
        n_tokens = int(is_img.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens but no pixel_values were given")
            if sync_vision:
                v, m = c.vision, c.vision.spatial_merge_size
                blank = torch.zeros(m * m, v.in_chans * v.temporal_patch_size * v.patch_size ** 2, device=self.device)
                feats = self.visual(blank, torch.tensor([[1, m, m]]))
                x = x + 0.0 * feats.sum().to(x.dtype)  # same values, a zero gradient through every vision unit
            return x
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        grids = image_grid_thw.to(torch.long)
        m2 = c.vision.spatial_merge_size ** 2
        expected = int(grids.prod(-1).sum()) // m2
        if n_tokens != expected:
            raise ValueError(f"input_ids hold {n_tokens} image tokens but the {len(grids)} image(s) of "
                             f"image_grid_thw need {expected}: expand each <|image_pad|> with the processor")
        if image_groups > 1:
            # images per row = runs of image tokens; keep the grids of each group's first row
            starts = is_img & ~F.pad(is_img, (1, 0))[:, :-1]
            per_row = starts.sum(-1).tolist()
            firsts = torch.cat([g for r, g in enumerate(grids.split(per_row)) if r % image_groups == 0])
        else:
            firsts = grids
        n_patches = int(firsts.prod(-1).sum())
        if pixel_values.shape[0] != n_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw describes "
                             f"{n_patches}")
        feats = self.visual(pixel_values.to(self.device), firsts).to(x.dtype)
        if image_groups > 1:
            per_group = is_img[::image_groups].sum(-1).tolist()
            feats = torch.cat([f for f in feats.split(per_group) for _ in range(image_groups)])
        x = x.clone()
        x[is_img] = feats
        return x

    def positions(self, input_ids, attention_mask=None, image_grid_thw=None):
        pos, next_pos = rope_index(input_ids, attention_mask, image_grid_thw, self.config)
        top = int(next_pos.max()) if len(next_pos) else 0
        if top > self.config.max_position_embeddings:
            raise ValueError(f"the prompt reaches position {top}, past the model's limit of "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")
        return pos, next_pos

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None,
                return_hidden=False, targets=None, chunk_size=1024, image_groups=1, sync_vision=False):
        """Logits [B, T, V]; or the final hidden states [B, T, D] with return_hidden=True; or, given `targets`
        [B, T] (the token wanted at each position, -100 where none), the log-probabilities [B, T] of those
        tokens (0 where -100), computed in chunks so that [tokens x vocab] logits never exist for the batch.

        attention_mask: [B, T], 0 on padding; values > 1 mark packed samples (tokens attend within their id).
        image_groups, sync_vision: see `embed` (G rows sharing one prompt's images run the vision tower once;
        the tower runs even without images)."""
        x = self.embed(input_ids, pixel_values, image_grid_thw, image_groups, sync_vision)
        if position_ids is None:
            position_ids, _ = self.positions(input_ids, attention_mask, image_grid_thw)
        cos, sin = mrope_cos_sin(position_ids, self.config, x.dtype)
        mask = None
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            mask = attention_mask_4d(attention_mask)
        for i, layer in enumerate(self.model.layers):
            if self.grad_ckpt and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        x = self.model.norm(x)
        if targets is not None:  # inside forward, so a sharded lm_head is gathered like every other weight
            return token_logprobs(x, self.lm_head.weight, targets, chunk_size)
        return x if return_hidden else self.lm_head(x)

    # -- generation --------------------------------------------------------------------------------------------
    def default_eos(self):
        return list(self.generation_eos or self.config.eos_token_id)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, max_new_tokens=64,
                 temperature=0.0, top_p=1.0, num_samples=1, eos_token_ids=None, top_k=0, return_logprobs=False,
                 generator=None, pad_token_id=None):
        """New tokens [B*num_samples, <= max_new_tokens] (row b*G+g is sample g of prompt b), pad after a stop.

        Prompts are left-padded (attention_mask 0 on padding); each prompt and its images are encoded once and
        its G samples read the same prompt cache. temperature 0 is greedy. eos_token_ids None: the checkpoint's;
        []: never stop. `generator`: a torch.Generator, or one per prompt (a prompt's samples then do not depend
        on which other prompts share the batch). return_logprobs: also the log-probability of each new token
        under softmax(logits / temperature) (temperature 1 when greedy), before top-k/top-p, as GRPO needs."""
        c = self.config
        B, P = input_ids.shape
        G = num_samples
        dev = self.device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dev)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left padding: a prompt ends with padding (use padding_side='left')")
        eos = self.default_eos() if eos_token_ids is None else list(eos_token_ids)
        pad = pad_token_id if pad_token_id is not None else (c.pad_token_id if c.pad_token_id is not None
                                                              else (eos[0] if eos else 0))
        pos, next_pos = self.positions(input_ids, attention_mask, image_grid_thw)
        limit = int(next_pos.max()) + max_new_tokens
        if limit > c.max_position_embeddings:
            raise ValueError(f"prompt plus max_new_tokens reaches position {limit}, past the model's limit of "
                             f"{c.max_position_embeddings}")
        out = torch.full((B * G, max_new_tokens), pad, dtype=torch.long, device=dev)
        logps = torch.zeros(B * G, max_new_tokens, dtype=torch.float32, device=dev) if return_logprobs else None
        if max_new_tokens == 0:
            return (out, logps) if return_logprobs else out

        # prefill: the prompts once
        kvh, hd, L = c.num_key_value_heads, c.head_dim, c.num_hidden_layers
        cache = KVCache(prefix=[], prefix_valid=None,
                        k=torch.empty(L, B, kvh, G, max_new_tokens, hd, dtype=self.dtype, device=dev),
                        v=torch.empty(L, B, kvh, G, max_new_tokens, hd, dtype=self.dtype, device=dev), group=G)
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        cos, sin = mrope_cos_sin(pos, c, x.dtype)
        mask = None if bool(attention_mask.all()) else attention_mask_4d(attention_mask)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        cache.prefix_valid = attention_mask.bool()
        logits = self.lm_head(self.model.norm(x[:, -1:]))[:, 0]  # [B, V]
        # Image/video placeholders stand for vision features: a generated one could not be fed back (the update
        # forward of GRPO would look for its image), so they are never sampled.
        never = torch.tensor([c.image_token_id, c.video_token_id], device=dev)
        logits = logits.repeat_interleave(G, dim=0)
        next_pos = next_pos.repeat_interleave(G)

        gens = generator if isinstance(generator, (list, tuple)) else None
        done = torch.zeros(B * G, dtype=torch.bool, device=dev)
        eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
        steps = 0
        for step in range(max_new_tokens):
            tok, lp = sample_tokens(logits, temperature, top_p, top_k, generator, gens, G, return_logprobs, never)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            out[:, step] = tok
            if return_logprobs:
                logps[:, step] = torch.where(done, torch.zeros_like(lp), lp)
            done = done | torch.isin(tok, eos_t)
            steps = step + 1
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            x = self.model.embed_tokens(tok)[:, None]
            p = (next_pos + step).view(1, -1, 1).expand(3, -1, 1)
            cos, sin = mrope_cos_sin(p, c, x.dtype)
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, None, cache, i)
            cache.n += 1
            logits = self.lm_head(self.model.norm(x[:, -1:]))[:, 0]
        out = out[:, :steps]
        return (out, logps[:, :steps]) if return_logprobs else out

    # -- checkpoints -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Qwen2VL":
        """A local folder or a hub id (downloaded with huggingface_hub only when `path` is not a folder).
        device="meta": the model's structure, configuration and generation settings only; no weight is read
        (ranks that receive their FSDP shards from rank 0 start from it)."""
        folder = resolve_checkpoint(path)
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{folder}: no config.json; not a Hugging Face checkpoint folder")
        with open(cfg_path) as f:
            config = Qwen2VLConfig.from_dict(json.load(f), cfg_path)
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype).to_empty(device=device)  # storage in the target dtype, uninitialised
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        if torch.device(device).type != "meta":
            load_weights(model, folder)
        model.source_dir = folder
        gen_path = os.path.join(folder, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                g = json.load(f).get("eos_token_id")
            if g is not None:
                model.generation_eos = g if isinstance(g, list) else [g]
        return model.eval()

    def save_pretrained(self, out_dir, state_dict=None, max_shard_bytes=5 * 1024 ** 3):
        """Write an HF-layout checkpoint atomically: a temporary sibling folder, then a rename.

        state_dict: tensors to write (e.g. gathered from FSDP shards); default this module's own."""
        save_checkpoint(self.config, state_dict if state_dict is not None else self.state_dict(), out_dir,
                        source_dir=self.source_dir, max_shard_bytes=max_shard_bytes,
                        generation_eos=self.generation_eos)


def _chunk_logprobs(h, weight, tgt):
    return torch.log_softmax(linear(h, weight).float(), dim=-1).gather(-1, tgt[:, None])[:, 0]


def token_logprobs(hidden, weight, targets, chunk_size=1024):
    """log softmax(hidden @ weight.T)[target] at the positions where target != -100, in chunks of rows.

    Each chunk is checkpointed: its [chunk x vocab] logits are dropped after use and recomputed in backward,
    so memory holds one chunk's logits at a time (151936 columns make them the largest tensor of a step)."""
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    where = targets != -100
    h, tgt = hidden[where], targets[where]
    parts = []
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i:i + chunk_size], weight, tgt[i:i + chunk_size])
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    if parts:
        out = out.masked_scatter(where, torch.cat(parts))
    return out


def sample_tokens(logits, temperature, top_p, top_k, generator, gens, group, want_logprobs, banned=None):
    """Next token per row (greedy when temperature is 0) and, if asked, its log-probability under
    softmax(logits / temperature). `banned` token ids are never chosen (their mass still counts in the
    log-probability, so it matches a plain forward pass of the model)."""
    logits = logits.float()
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    if temperature <= 0:
        tok = (logits if banned is None else logits.index_fill(-1, banned, float("-inf"))).argmax(-1)
    else:
        scores = logp.clone() if banned is None else logp.index_fill(-1, banned, float("-inf"))
        if top_k and top_k < scores.shape[-1]:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            sorted_s, order = scores.sort(dim=-1, descending=True)
            probs = sorted_s.softmax(-1)
            # drop a token when the tokens ranked above it already hold top_p of the mass
            drop = probs.cumsum(-1) - probs >= top_p
            scores = scores.scatter(-1, order, sorted_s.masked_fill(drop, float("-inf")))
        # Exponential race: argmax(log p - log E), E ~ Exp(1), draws from softmax(scores). Its noise comes from
        # one generator per prompt when given, so a prompt's samples do not depend on the rest of the batch.
        if gens is not None:
            noise = torch.cat([torch.empty(group, scores.shape[-1], device=scores.device).exponential_(generator=g)
                               for g in gens])
        else:
            noise = torch.empty_like(scores).exponential_(generator=generator)
        tok = (scores - noise.log()).argmax(-1)
    lp = logp.gather(-1, tok[:, None])[:, 0] if want_logprobs else None
    return tok, lp


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files


def resolve_checkpoint(path, local_files_only: bool = False) -> str:
    """The local folder of a checkpoint: `path` itself, or a hub id's snapshot (downloaded unless
    local_files_only, which reads only what an earlier download left in the cache)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; give the checkpoint folder (with config.json) or a hub id")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"],
                                 local_files_only=local_files_only)
    except Exception as e:  # offline, unknown repo, ...: say what was tried
        raise FileNotFoundError(f"{path!r} is not a local folder and could not be fetched from the hub: {e}") from e


def canonical_key(k: str) -> str:
    """Newer exports nest the decoder under model.language_model and the tower under model.visual."""
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    if k.startswith("model.visual."):
        return "visual." + k[len("model.visual."):]
    if k.startswith("language_model.model."):
        return "model." + k[len("language_model.model."):]
    if k.startswith("language_model.lm_head."):
        return k[len("language_model."):]
    return k


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors_header(path):
    """(tensor entries, byte offset of the tensor data) of a .safetensors file that the safetensors library has
    validated first: the header parses, each tensor's byte range fits its shape and dtype, and the ranges cover
    the data exactly. A damaged file (a download cut short, say) raises ValueError naming the file and, where
    the header still reads, the first tensor it loses: it never loads as zeros or garbage."""
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), framework="pt"):
            pass  # maps the file and checks the header against its size; touches no tensor data
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' own error type; its message says what is inconsistent
        raise ValueError(f"{path}: damaged safetensors file ({e}){_first_bad_tensor(path)}; download or save it "
                         f"again") from None
    return _raw_header(path)


def _raw_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _first_bad_tensor(path) -> str:
    """Where a file that safetensors refused goes wrong, told by tensor, for the error message."""
    try:
        header, base = _raw_header(path)
        data = os.path.getsize(path) - base
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    except Exception:  # noqa: BLE001 - any failure here means the header itself is unreadable
        return ": its header is cut short or unreadable"
    for name, meta in entries:
        start, end = meta["data_offsets"]
        if end > data:
            return (f": tensor {name} needs data bytes {start}..{end} but the file holds {data} "
                    f"({sum(m['data_offsets'][1] > data for _, m in entries)} tensors cut off)")
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is not None and math.prod(meta["shape"]) * dtype.itemsize != end - start:
            return f": tensor {name} has {end - start} bytes, not what shape {meta['shape']} of {meta['dtype']} needs"
    return ""


def iter_safetensors(path, wanted=None, header=None):
    """(name, tensor) for each tensor of a .safetensors file, read with plain reads; `header`: what
    read_safetensors_header(path) returned, if the caller has it already.

    Reading instead of mapping the file keeps the loader's peak memory at the model plus one tensor; when the
    tensor is consumed before the next is read, nothing accumulates (a mapped file's pages would count too)."""
    header, base = header or read_safetensors_header(path)
    with open(path, "rb") as f:
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if wanted is not None and name not in wanted:
                continue
            start, end = meta["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
            buf = bytearray(end - start)
            f.seek(base + start)
            if f.readinto(buf) != len(buf):  # validated above: only a file changed while loading gets here
                raise ValueError(f"{path}: tensor {name}: the file ended early; was it rewritten while loading?")
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield name, t.view(meta["shape"])


def checkpoint_dtype(folder) -> torch.dtype:
    """The floating dtype most of a checkpoint's weights are stored in (by bytes), read from the file headers."""
    total = {}
    for path in checkpoint_files(folder):
        for meta in read_safetensors_header(path)[0].values():
            dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
            if dtype is not None and dtype.is_floating_point:
                total[dtype] = total.get(dtype, 0) + meta["data_offsets"][1] - meta["data_offsets"][0]
    if not total:
        raise ValueError(f"{folder}: no floating-point weights")
    return max(total, key=total.get)


def checkpoint_files(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, fn) for fn in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(fn for fn in os.listdir(folder) if fn.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"{folder}: no .safetensors weights (pickled .bin checkpoints are not loaded: "
                                f"convert them to safetensors first)")
    return [os.path.join(folder, fn) for fn in found]


def weight_plan(model: Qwen2VL, folder) -> list:
    """What to read for `model` from the checkpoint in `folder`, decided from the file headers alone (every file
    validated first; no tensor data read): [(file, header, {name in the file: parameter name})]. The model may be
    on the meta device. One error lists every missing, unexpected and mis-shaped tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    need = set(params) - ({"lm_head.weight"} if tied else set())
    seen, unexpected, bad_shape, plan = set(), [], [], []
    for path in checkpoint_files(folder):
        header = read_safetensors_header(path)
        wanted = {}
        for raw, meta in header[0].items():
            k = canonical_key(raw)
            if k not in params or (tied and k == "lm_head.weight"):
                if not (tied and k == "lm_head.weight"):
                    unexpected.append(raw)
                continue
            seen.add(k)  # a mis-shaped tensor is reported as such rather than as missing
            if list(params[k].shape) != list(meta["shape"]):
                bad_shape.append(f"{raw}: checkpoint {list(meta['shape'])}, model {list(params[k].shape)}")
            else:
                wanted[raw] = k
        plan.append((path, header, wanted))
    missing = sorted(need - seen)
    if missing or unexpected or bad_shape:
        def show(xs):
            return ", ".join(xs[:12]) + (f" ... (+{len(xs) - 12} more)" if len(xs) > 12 else "")
        lines = [f"{folder}: checkpoint does not match the Qwen2-VL config"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {show(sorted(unexpected))}")
        if bad_shape:
            lines.append(f"  wrong shape ({len(bad_shape)}): {show(bad_shape)}")
        raise ValueError("\n".join(lines))
    return plan


def read_weights(plan):
    """(parameter name, tensor) for every tensor of a weight_plan, read one at a time, in file order."""
    for path, header, wanted in plan:
        for raw, t in iter_safetensors(path, wanted, header):
            yield wanted[raw], t


def load_weights(model: Qwen2VL, folder):
    """Copy every checkpoint tensor into the (already allocated) parameters."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for k, t in read_weights(weight_plan(model, folder)):
            params[k].copy_(t)


CARRIED_FILES = ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
                 "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"]


def save_checkpoint(config: Qwen2VLConfig, state_dict, out_dir, source_dir=None, max_shard_bytes=5 * 1024 ** 3,
                    generation_eos=None, extra_files=None):
    """HF layout (config.json, model.safetensors or shards + index, tokenizer/preprocessor files), atomically."""
    from safetensors.torch import save_file
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        tensors = {}
        for k, t in state_dict.items():
            if config.tie_word_embeddings and k == "lm_head.weight":
                continue  # tied: the checkpoint keeps one copy, as the original does
            tensors[k] = t.detach().to("cpu").contiguous()
        dtype = next(iter(tensors.values())).dtype
        shards, cur, size = [], {}, 0
        for k in sorted(tensors):
            nbytes = tensors[k].numel() * tensors[k].element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = tensors[k]
            size += nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        cfg = config.to_dict()
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        gen = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
               "eos_token_id": list(generation_eos or config.eos_token_id), "do_sample": False}
        if source_dir and os.path.exists(os.path.join(source_dir, "generation_config.json")):
            with open(os.path.join(source_dir, "generation_config.json")) as f:
                gen = {**json.load(f), **{k: gen[k] for k in ("eos_token_id",)}}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        if source_dir:
            for fn in CARRIED_FILES:
                if os.path.exists(os.path.join(source_dir, fn)):
                    shutil.copy2(os.path.join(source_dir, fn), os.path.join(tmp, fn))
        for fn, content in (extra_files or {}).items():
            with open(os.path.join(tmp, fn), "w") as f:
                f.write(content)
        # mkdtemp (and safetensors) create private files; a checkpoint gets the usual umask-based modes
        umask = os.umask(0)
        os.umask(umask)
        for fn in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fn), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        # Swap in: the old folder (if any) is moved aside first, so a crash leaves either the old or the new one.
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Command line: ask a model about an image


def main(argv=None):
    ap = argparse.ArgumentParser(description="Ask a Qwen2-VL / TinyRS model about an image.")
    ap.add_argument("question", help="the question to ask")
    ap.add_argument("--model", required=True, help="checkpoint folder or hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)")
    ap.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    ap.add_argument("--system", default=None, help="system prompt (default: the checkpoint's default)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--min-pixels", type=int, default=None, help="override the processor's min_pixels")
    ap.add_argument("--max-pixels", type=int, default=None, help="override the processor's max_pixels")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from data import Processor, load_image
    dtype = {"auto": torch.bfloat16 if a.device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    images = [load_image(p) for p in a.image]
    proc = Processor.from_pretrained(a.model, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    model = Qwen2VL.from_pretrained(a.model, dtype=dtype, device=a.device)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": a.question}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                    system_prompt=a.system)
    batch = proc(text=[text], images=images or None)
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    new = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                         max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                         generator=g)
    print(proc.decode(new[0], skip_special_tokens=True))


if __name__ == "__main__":
    sys.exit(main())
