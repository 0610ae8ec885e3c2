"""Qwen2-VL in plain PyTorch: configuration, vision tower, patch merger, Qwen2 decoder with M-RoPE, KV cache,
sampling and generation. It imports nothing else of this project; checkpoint files (config.json's layouts,
safetensors) are checkpoint.py's.

Module and parameter names follow the original checkpoint layout (`model.layers.0.self_attn.q_proj.weight`,
`visual.blocks.0.attn.qkv.weight`, ...), so a state dict maps onto a checkpoint with no renaming table.
The facts it implements: the 2B has 28 decoder layers of width 1536 (12 query heads, 2 key/value heads of 128,
SwiGLU MLP of 8960, RMSNorm, rotary theta 1e6 split 16/24/24 between the time, height and width axes), and a
32-block vision tower of width 1280 (16 heads, QuickGELU MLP of ratio 4, LayerNorm, 2-D rotary on the patch
row and column) over 14x14 patches of 2-frame clips, whose 2x2 neighbouring patches the merger folds into one
language token (LayerNorm, 5120 -> 5120 -> GELU -> 1536). The embedding and the output head are tied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

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

# ----------------------------------------------------------------------------------------------------------------
# Shared pieces

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device) -> torch.dtype:
    """A --dtype flag's value: "auto" is bf16 on GPU and fp32 on CPU, else a name in DTYPES."""
    return (torch.bfloat16 if str(device).startswith("cuda") else torch.float32) if name == "auto" else DTYPES[name]


def _amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return False


# Under inference mode (generate: evaluation, GRPO rollouts, the CLI) CPU fp32 matrix products run on oneDNN
# rather than the BLAS behind F.linear when the CPU is AMD's. MKL, that BLAS, is Intel's library and takes
# slower paths on AMD: on a 2-core AMD EPYC it reached ~20 GB/s on the one-row products of decoding and ~175
# GFLOPS on prefill, oneDNN ~37 GB/s and ~400 GFLOPS on the same weights (2B fp32 decode 1.8x faster); on a
# 2-core Intel Xeon MKL is the faster one (2B fp32 decode 4.40 against 3.78 tok/s). Plain forward passes
# (training, reference log-probs) keep F.linear, so a forward gives the same bits with and without grad.
ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_CPU_LINEAR = ONEDNN_AVAILABLE and _amd_cpu()


def linear(x, weight, bias=None):
    """F.linear, through oneDNN for CPU fp32 under inference mode (see ONEDNN_CPU_LINEAR)."""
    if (ONEDNN_CPU_LINEAR and not torch.compiler.is_compiling()  # compiled code picks its own kernels
            and torch.is_inference_mode_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(weight) in (torch.Tensor, nn.Parameter)):  # not a DTensor shard
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose forward goes through `linear`; or, once
    set_int8(weight) has run, int8 weights per output channel through torch's x86 dynamic quantized linear
    (fbgemm: the activations are quantized on the fly, the product accumulates in int32)."""
    packed = None  # the int8 weight, prepacked for the quantized kernel

    def set_int8(self, weight: torch.Tensor):
        """Replace the weight by its int8 form (scale per output channel: its largest magnitude / 127)."""
        import warnings
        w = weight.detach().float()
        scales = (w.abs().amax(1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; its x86 int8 kernels remain
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scales, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.weight = None

    def forward(self, x):
        if self.packed is not None:
            y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed, False)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)


class Int8Embedding(nn.Module):
    """An embedding table in int8 with a scale per row (an int8 model's: its rows are only looked up)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scales = (w.abs().amax(1) / 127.0).clamp(min=1e-12)
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales)

    def forward(self, ids):
        return self.weight[ids].float() * self.scales[ids, None]


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


def span_attention(q, k, v, spans, causal: bool):
    """Attention within each span (start, end) of flattened tokens: q [N, H, hd], k and v [N, KVH, hd] (grouped
    query heads when KVH < H). A token outside every span gets zeros. Spans of equal length run as one batch, so
    no [tokens x tokens] mask is ever built: memory and time grow with the spans' squared lengths, not N^2."""
    out = q.new_zeros(q.shape)
    by_len = {}
    for start, end in spans:
        by_len.setdefault(end - start, []).append(start)
    for n, starts in by_len.items():
        idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)).flatten()
        qs, ks, vs = (t[idx].view(len(starts), n, t.shape[1], -1).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=ks.shape[1] != qs.shape[1])
        out[idx] = o.transpose(1, 2).reshape(-1, q.shape[1], o.shape[-1])
    return out


def causal_attention(q, k, v, spans=None):
    """Causal attention of q [B, H, T, hd] over k, v [B, KVH, T, hd]: within each row (spans None) or within each
    (row, start, end) of `spans` (see attention_spans)."""
    B, H, T, hd = q.shape
    if spans is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != H)
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], hd) for t in (q, k, v)]
    out = span_attention(*flat, [(b * T + s, b * T + e) for b, s, e in spans], causal=True)
    return out.view(B, T, H, hd).transpose(1, 2)


class SharedPrompts:
    """How attention runs over one stream that holds B left-padded prompts of P tokens once, then G completions of
    L tokens for each prompt ([1, B*P + B*G*L] tokens, prompt b's completions at rows b*G .. b*G+G-1). A prompt
    attends causally within itself; a completion attends to its prompt's tokens (padding hidden) and causally to
    its own. Every token's output is then what a row [prompt | completion] would give it, but each prompt runs
    through the decoder once instead of G times (GRPO's update). Its keys and values carry gradients to all G.

    A plain class, not a dataclass, for the reason KVCache gives."""

    def __init__(self, prompt_mask, group: int, length: int):
        B, P = prompt_mask.shape
        self.B, self.P, self.G, self.L = B, P, group, length
        self.prompt_spans = attention_spans(prompt_mask)
        valid = prompt_mask.bool().repeat_interleave(group, 0)[:, None, None, :].expand(-1, 1, length, -1)
        causal = torch.ones(length, length, dtype=torch.bool, device=prompt_mask.device).tril()
        self.mask = torch.cat([valid, causal.expand(B * group, 1, -1, -1)], -1)  # [B*G, 1, L, P + L]

    def attend(self, q, k, v):
        """q [1, H, N, hd], k and v [1, KVH, N, hd] over the stream -> [1, H, N, hd]."""
        B, P, G, L, n = self.B, self.P, self.G, self.L, self.B * self.P

        def split(t):  # -> prompts [B, h, P, hd], completions [B*G, h, L, hd]
            h, hd = t.shape[1], t.shape[3]
            return (t[0, :, :n].view(h, B, P, hd).transpose(0, 1), t[0, :, n:].view(h, B * G, L, hd).transpose(0, 1))
        (qp, qc), (kp, kc), (vp, vc) = split(q), split(k), split(v)
        op = causal_attention(qp, kp, vp, self.prompt_spans)
        H, hd = q.shape[1], q.shape[3]
        keys, values = (torch.cat([p.repeat_interleave(G, 0), c], 2) for p, c in ((kp, kc), (vp, vc)))
        gqa = keys.shape[1] != H
        if gqa and q.device.type == "cuda":  # CUDA's kernels that take a mask do not take grouped heads (only the
            keys, values = (t.repeat_interleave(H // t.shape[1], 1) for t in (keys, values))  # math one would)
            gqa = False
        oc = F.scaled_dot_product_attention(qc, keys, values, attn_mask=self.mask, enable_gqa=gqa)
        return torch.cat([op.transpose(0, 1).reshape(H, n, hd), oc.transpose(0, 1).reshape(H, -1, hd)], 1)[None]


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
        ends = torch.tensor(lengths).cumsum(0).tolist()
        out = span_attention(q, k, v, zip([0] + ends[:-1], ends), causal=False)  # attention stays inside each image
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

    The generated part is static: buffers of all N new positions, zero-filled, written at `pos` (a tensor) and
    read whole with the positions past `pos` hidden. Every decode step then has the same shapes and no Python
    state, so torch.compile can capture it once (and replay it as a CUDA graph).

    A plain class on purpose, not a dataclass: wrappers that rebuild a layer's inputs (FSDP's input cast copies
    dataclasses and lists) pass it through untouched, so what the prefill stores is what decoding reads."""

    def __init__(self, layers: int, batch: int, kv_heads: int, group: int, new_tokens: int, head_dim: int, dtype,
                 device):
        self.prefix = []  # per layer (k, v) [B, KVH, P, hd], appended by the prefill
        self.prefix_valid = None  # [B, P] bool, False on padding
        shape = (layers, batch, kv_heads, group, new_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # zeros: hidden positions must not hold NaN
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.group = group
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # the generated position written next
        self.positions = torch.arange(new_tokens, device=device)


class Attention(nn.Module):
    def __init__(self, c: Qwen2VLConfig):
        super().__init__()
        self.heads, self.kv_heads, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.heads * self.hd)
        self.k_proj = Linear(c.hidden_size, self.kv_heads * self.hd)
        self.v_proj = Linear(c.hidden_size, self.kv_heads * self.hd)
        self.o_proj = Linear(self.heads * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, spans=None, cache: KVCache | None = None, layer: int = 0, decode: bool = False):
        """Causal self-attention over x: within each row (spans None), or within each (row, start, end) of `spans`
        (packed samples, left padding: see attention_spans), or prompts shared by their completions (spans a
        SharedPrompts). With `cache`, the prefill (decode False: x is the
        prompt, its keys and values are stored) or a decode step (decode True: new tokens against the cache)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if decode:
            out = self._decode(q, k, v, cache, layer)
        else:
            if cache is not None:
                cache.prefix.append((k, v))
            out = spans.attend(q, k, v) if isinstance(spans, SharedPrompts) else causal_attention(q, k, v, spans)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _decode(self, q, k, v, cache: KVCache, layer):
        """One new token per row against [prompt | generated], the prompt read once for all of a prompt's samples.

        Layout [B, kv_heads, G, heads per kv head, ...]: the query heads that share a kv head and the G samples that
        share a prompt fold into one matrix product with the prompt's keys (plain matmuls: einsum is slow here)."""
        BG, H, _, hd = q.shape
        G = cache.group
        pk, pv = cache.prefix[layer]
        B, KVH = pk.shape[0], pk.shape[1]
        rep = H // KVH
        at = cache.pos.view(1)
        cache.k[layer].index_copy_(3, at, k.reshape(B, G, KVH, 1, hd).transpose(1, 2))
        cache.v[layer].index_copy_(3, at, v.reshape(B, G, KVH, 1, hd).transpose(1, 2))
        sk, sv = cache.k[layer], cache.v[layer]  # [B, KVH, G, N, hd], the whole buffer
        qg = q.reshape(B, G, KVH, rep, hd).transpose(1, 2) * (1.0 / math.sqrt(hd))  # [B, KVH, G, rep, hd]
        P = pk.shape[2]
        sp = (qg.reshape(B, KVH, G * rep, hd) @ pk.transpose(-1, -2)).view(B, KVH, G, rep, P)
        sp = sp.float().masked_fill(~cache.prefix_valid[:, None, None, None, :], float("-inf"))
        ss = (qg @ sk.transpose(-1, -2)).float().masked_fill(cache.positions > cache.pos, float("-inf"))
        p = torch.cat([sp, ss], dim=-1).softmax(-1).to(q.dtype)  # softmax in fp32
        out = (p[..., :P].reshape(B, KVH, G * rep, P) @ pv).view(B, KVH, G, rep, hd)
        out = out + p[..., P:] @ sv
        return out.transpose(1, 2).reshape(BG, H, 1, hd)


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

    def forward(self, x, cos, sin, spans=None, cache=None, layer=0, decode=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, spans, cache, layer, decode)
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


def attention_spans(segments):
    """How causal attention is cut, from [B, T] segment ids (0 = padding; tokens attend to earlier tokens of their
    own id): None when each row is one segment from position 0 (no padding, or only on the right, where causal
    attention alone is exact for every real token), else [(row, start, end)] of every segment (packed samples,
    left padding), for span_attention. Padding tokens outside every span get zero attention output."""
    if segments is None:
        return None
    seg = segments.cpu()
    B, T = seg.shape
    cut = torch.ones(B, T, dtype=torch.bool)
    cut[:, 1:] = seg[:, 1:] != seg[:, :-1]
    spans = []
    for b in range(B):
        starts = torch.nonzero(cut[b]).flatten().tolist() + [T]
        spans += [(b, s, e) for s, e in zip(starts, starts[1:]) if seg[b, s] > 0]
    if len(spans) == B and all(s == 0 for _, s, _ in spans):
        return None
    return spans


def left_padded(input_ids, attention_mask, who: str):
    """The prompts' mask on their device (all ones when None), refused unless every prompt ends with a real token:
    what comes next (new tokens, completions) continues from the last column."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    if bool((mask[:, -1] == 0).any()):
        raise ValueError(f"{who} needs left padding: a prompt ends with padding (use padding_side='left')")
    return mask


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
        self._decode_fn = None  # compile_decode's compiled decode_step
        self.source_dir = None  # where tokenizer/preprocessor files come from when saving
        self.generation_eos = None  # eos ids from generation_config.json, if the checkpoint has one

    @property
    def dtype(self):
        """The compute dtype (the norms': an int8 model keeps them, and its embedding, in other dtypes)."""
        return self.model.norm.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def set_grad_checkpointing(self, on=True):
        self.grad_ckpt = on
        self.visual.grad_ckpt = on

    # -- embedding of text and images ------------------------------------------------------------------------
    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, sync_vision=False):
        """Token embeddings with each image's merged features at its <|image_pad|> tokens.

        sync_vision: without images, run the vision tower anyway, on a blank image of one merged token whose
        features are added with weight 0. Under FSDP every rank must run (and back-propagate through) the same
        units: a text-only batch on one rank while another has images would otherwise stall the collectives."""
        c = self.config
        x = self.model.embed_tokens(input_ids).to(self.dtype)
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
        n_patches = int(grids.prod(-1).sum())
        if pixel_values.shape[0] != n_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw describes "
                             f"{n_patches}")
        feats = self.visual(pixel_values.to(self.device), grids).to(x.dtype)
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
                return_hidden=False, targets=None, chunk_size=1024, sync_vision=False, completions=None,
                temperature=1.0):
        """Logits [B, T, V]; or the final hidden states [B, T, D] with return_hidden=True; or, given `targets`
        [B, T] (the token wanted at each position, -100 where none), the log-probabilities [B, T] of those
        tokens (0 where -100) under softmax(logits / temperature), computed in chunks so that [tokens x vocab]
        logits never exist for the batch.

        attention_mask: [B, T], 0 on padding; values > 1 mark packed samples (tokens attend within their id).
        sync_vision: see `embed` (the vision tower runs even without images).
        completions [B*G, L]: G continuations of each (left-padded) prompt, rows b*G .. b*G+G-1 continuing prompt
        b; `targets` [B*G, L] then names the completion tokens to score (-100 elsewhere) and the result is their
        log-probabilities [B*G, L], as from rows [prompt | completion], with each prompt run once (SharedPrompts).
        This is a mode of forward, not a method of its own, so FSDP gathers the weights as for any forward."""
        if completions is not None:
            return self._completion_logprobs(input_ids, attention_mask, pixel_values, image_grid_thw, completions,
                                             targets, chunk_size, temperature, sync_vision)
        x = self.embed(input_ids, pixel_values, image_grid_thw, sync_vision)
        if position_ids is None:
            position_ids, _ = self.positions(input_ids, attention_mask, image_grid_thw)
        cos, sin = mrope_cos_sin(position_ids, self.config, x.dtype)
        x = self.model.norm(self.run_decoder(x, cos, sin, attention_spans(attention_mask)))
        if targets is not None:  # inside forward, so a sharded lm_head is gathered like every other weight
            return token_logprobs(x, self.lm_head.weight, targets, chunk_size, temperature)
        return x if return_hidden else self.lm_head(x)

    def _completion_logprobs(self, input_ids, attention_mask, pixel_values, image_grid_thw, completions, targets,
                             chunk_size, temperature, sync_vision=False):
        B, P = input_ids.shape
        G, L = completions.shape[0] // B, completions.shape[1]
        attention_mask = left_padded(input_ids, attention_mask, "scoring completions")
        if B * G != completions.shape[0] or targets is None or targets.shape != completions.shape:
            raise ValueError(f"completions {tuple(completions.shape)} must hold G rows per prompt ({B} prompts) and "
                             f"targets the same shape")
        pos, next_pos = self.positions(input_ids, attention_mask, image_grid_thw)
        # completion tokens are text: all three M-RoPE axes continue from the prompt's next free position
        cpos = (next_pos.repeat_interleave(G)[:, None] + torch.arange(L, device=next_pos.device)).reshape(1, 1, -1)
        position_ids = torch.cat([pos.reshape(3, 1, B * P), cpos.expand(3, 1, -1)], -1)
        x = torch.cat([self.embed(input_ids, pixel_values, image_grid_thw, sync_vision).reshape(1, B * P, -1),
                       self.model.embed_tokens(completions).to(self.dtype).reshape(1, B * G * L, -1)], 1)
        cos, sin = mrope_cos_sin(position_ids, self.config, x.dtype)
        h = self.model.norm(self.run_decoder(x, cos, sin, SharedPrompts(attention_mask, G, L)))[0]
        first = h[:B * P].view(B, P, -1)[:, -1].repeat_interleave(G, 0)  # the prompt's last token predicts token 0
        h = torch.cat([first[:, None], h[B * P:].view(B * G, L, -1)[:, :-1]], 1)
        return token_logprobs(h, self.lm_head.weight, targets, chunk_size, temperature)

    def run_decoder(self, x, cos, sin, spans=None, cache: KVCache | None = None, decode: bool = False):
        """The decoder stack, before the final norm: a forward (activation-checkpointed when on and training), the
        prefill that fills `cache`, or one decode step that reads it."""
        for i, layer in enumerate(self.model.layers):
            if self.grad_ckpt and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, spans, use_reentrant=False)
            else:
                x = layer(x, cos, sin, spans, cache, i, decode)
        return x

    # -- generation --------------------------------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, cache: KVCache):
        """Run the (left-padded) prompts once, storing their keys and values in `cache`; next-token logits [B, V]."""
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        cos, sin = mrope_cos_sin(position_ids, self.config, x.dtype)
        x = self.run_decoder(x, cos, sin, attention_spans(attention_mask), cache)
        cache.prefix_valid = attention_mask.bool()
        return self.lm_head(self.model.norm(x[:, -1:]))[:, 0]

    def decode_step(self, tokens, positions, cache: KVCache):
        """One new token per row ([rows]) at `positions` ([rows], equal on the three M-RoPE axes) against the
        cache, written at cache.pos; next-token logits [rows, V]. The step generate repeats: compile_decode
        compiles it whole."""
        x = self.model.embed_tokens(tokens)[:, None].to(self.dtype)
        cos, sin = mrope_cos_sin(positions.view(1, -1, 1).expand(3, -1, 1), self.config, x.dtype)
        x = self.run_decoder(x, cos, sin, None, cache, decode=True)
        return self.lm_head(self.model.norm(x[:, -1:]))[:, 0]

    def compile_decode(self, mode: str | None = None) -> "Qwen2VL":
        """Compile decode_step with torch.compile (fullgraph); generate then runs the compiled step. mode
        "reduce-overhead" replays it as a CUDA graph on GPU, where an eager step is bound by kernel launches."""
        self._decode_fn = torch.compile(self.decode_step, mode=mode, fullgraph=True, dynamic=False)
        return self

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
        attention_mask = left_padded(input_ids, attention_mask, "generate")
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

        cache = KVCache(c.num_hidden_layers, B, c.num_key_value_heads, G, max_new_tokens, c.head_dim, self.dtype, dev)
        if self._decode_fn is not None and dev.type == "cuda":  # a CUDA graph may write into these: fixed addresses
            for t in (cache.k, cache.v, cache.pos, cache.positions):
                torch._dynamo.mark_static_address(t)
        logits = self.prefill(input_ids, attention_mask, pixel_values, image_grid_thw, pos, cache)
        # Image/video placeholders stand for vision features: a generated one could not be fed back (the update
        # forward of GRPO would look for its image), so they are never sampled.
        never = torch.tensor([c.image_token_id, c.video_token_id], device=dev)
        logits = logits.repeat_interleave(G, dim=0)
        next_pos = next_pos.repeat_interleave(G)

        gens = generator if isinstance(generator, (list, tuple)) else None
        done = torch.zeros(B * G, dtype=torch.bool, device=dev)
        length = torch.full((B * G,), max_new_tokens, dtype=torch.long, device=dev)  # stop token included
        eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
        step_fn = self._decode_fn or self.decode_step
        check = 8 if dev.type == "cuda" else 1  # "all stopped?" syncs a GPU: ask every few steps there
        for step in range(max_new_tokens):
            tok, lp = sample_tokens(logits, temperature, top_p, top_k, generator=generator, generators=gens, group=G,
                                    want_logprobs=return_logprobs, banned=never)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            out[:, step] = tok
            if return_logprobs:
                logps[:, step] = torch.where(done, torch.zeros_like(lp), lp)
            stop = ~done & torch.isin(tok, eos_t)
            length = torch.where(stop, step + 1, length)
            done = done | stop
            if step == max_new_tokens - 1 or (step % check == check - 1 and bool(done.all())):
                break
            logits = step_fn(tok, next_pos + cache.pos, cache)
            cache.pos += 1
        steps = int(length.max()) if bool(done.all()) else step + 1  # columns after every row stopped: dropped
        out = out[:, :steps]
        return (out, logps[:, :steps]) if return_logprobs else out

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, config: Qwen2VLConfig, dtype=torch.float32, device="cpu") -> "Qwen2VL":
        """The model with uninitialised storage in `dtype` on `device` (on "meta": no storage at all), tied head
        included: built on the meta device first, so no throw-away initialisation ever runs."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype).to_empty(device=device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model


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


def _chunk_logprobs(h, weight, tgt, temperature):
    return torch.log_softmax(linear(h, weight).float() / temperature, dim=-1).gather(-1, tgt[:, None])[:, 0]


def token_logprobs(hidden, weight, targets, chunk_size=1024, temperature=1.0):
    """log softmax(hidden @ weight.T / temperature)[target] at the positions where target != -100, in chunks of rows.

    Each chunk is checkpointed: its [chunk x vocab] logits are dropped after use and recomputed in backward,
    so memory holds one chunk's logits at a time (151936 columns make them the largest tensor of a step)."""
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    where = targets != -100
    h, tgt = hidden[where], targets[where]
    parts = []
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i:i + chunk_size], weight, tgt[i:i + chunk_size], temperature)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    if parts:
        out = out.masked_scatter(where, torch.cat(parts))
    return out


def sample_tokens(logits, temperature=0.0, top_p=1.0, top_k=0, *, generator=None, generators=None, group=1,
                  want_logprobs=False, banned=None):
    """Next token per row (greedy when temperature is 0) and, if asked, its log-probability under
    softmax(logits / temperature). `banned` token ids are never chosen (their mass still counts in the
    log-probability, so it matches a plain forward pass of the model). `generators`: one per prompt, each drawing
    for its `group` consecutive rows; else `generator` for all rows."""
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
        if generators is not None:
            noise = torch.cat([torch.empty(group, scores.shape[-1], device=scores.device).exponential_(generator=g)
                               for g in generators])
        else:
            noise = torch.empty_like(scores).exponential_(generator=generator)
        tok = (scores - noise.log()).argmax(-1)
    lp = logp.gather(-1, tok[:, None])[:, 0] if want_logprobs else None
    return tok, lp
