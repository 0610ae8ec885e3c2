"""Hugging Face checkpoint files for Qwen2-VL: find them (a folder, or a hub id fetched with huggingface_hub),
validate them, read them into a model, and write them back, in safetensors only (never pickle).

    import checkpoint as CK
    model = CK.load("Qwen/Qwen2-VL-2B-Instruct", dtype=torch.bfloat16, device="cuda")
    CK.save_model(model, "out/")        # loads in transformers and vLLM

Layouts read: config.json flat (the original Qwen2-VL release) or nested (`text_config`, `in_channels`), tensor
names as released (`model.layers.0...`, `visual.blocks.0...`) or prefixed (`model.language_model.`,
`model.visual.`), one model.safetensors or shards with model.safetensors.index.json, lm_head absent when tied.
Every file is validated by the safetensors library before a byte of tensor data is read, then read one tensor at
a time into storage already in the target dtype: memory stays at the model plus one tensor. Writing goes to a
temporary sibling folder that replaces the target whole, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile

import torch

from torch import nn

from model import Int8Embedding, Linear, Qwen2VL, Qwen2VLConfig, VisionConfig


def load(path, dtype=torch.float32, device="cpu", quantize: str | None = None) -> Qwen2VL:
    """The model in a checkpoint folder or hub id (downloaded only when `path` is not a folder). device="meta":
    structure, configuration and generation settings only, no weight read (ranks that receive their FSDP shards
    from rank 0 start from it). quantize="int8": for CPU inference, see load_int8."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    folder = resolve_checkpoint(path)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{folder}: no config.json; not a Hugging Face checkpoint folder")
    with open(cfg_path) as f:
        config = config_from_json(json.load(f), cfg_path)
    if quantize == "int8":
        if torch.device(device).type != "cpu":
            raise ValueError("int8 weights are for CPU decoding (x86 kernels); on a GPU load bfloat16")
        model = load_int8(config, folder)
    else:
        model = Qwen2VL.empty(config, dtype, device)
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


def config_from_json(d: dict, source: str = "config.json") -> Qwen2VLConfig:
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
    cfg = Qwen2VLConfig(
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


def config_to_json(config: Qwen2VLConfig) -> dict:
    """The original flat layout: the one Qwen2-VL-2B-Instruct ships and every transformers version reads."""
    v, c = config.vision, config
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(c.mrope_section)},
        "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings, "max_window_layers": c.num_hidden_layers,
        "use_sliding_window": False, "sliding_window": c.max_position_embeddings, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True,
        "image_token_id": c.image_token_id, "video_token_id": c.video_token_id,
        "vision_start_token_id": c.vision_start_token_id, "vision_end_token_id": c.vision_end_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id[0] if len(c.eos_token_id) == 1 else list(c.eos_token_id),
        "pad_token_id": c.pad_token_id,
        "vision_config": {"depth": v.depth, "embed_dim": v.embed_dim, "num_heads": v.num_heads,
                          "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
                          "patch_size": v.patch_size, "hidden_act": "quick_gelu",
                          "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
                          "in_chans": v.in_chans, "hidden_size": v.hidden_size},
    }


def load_int8(config: Qwen2VLConfig, folder) -> Qwen2VL:
    """The model for CPU inference with every linear layer in int8 (a scale per output channel; decoder, output
    head and vision tower), quantized tensor by tensor as the file is read: the fp32 model never exists, so
    memory peaks at the int8 model plus one tensor. The embedding is int8 too, with a scale per row (it is only
    looked up); norms, biases and the patch embedding stay fp32, the compute dtype. A packed int8 weight costs
    ~1.04 bytes per weight, once the heap the fp32 reads passed through is given back (release_heap)."""
    model = Qwen2VL.empty(config, torch.float32, "meta")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    for name, mod in model.named_modules():  # storage for everything but the linear weights and the embedding
        for pname, p in list(mod.named_parameters(recurse=False)):
            if not (name in linears and pname == "weight") and mod is not model.model.embed_tokens:
                setattr(mod, pname, nn.Parameter(torch.empty(p.shape), requires_grad=False))
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, t in read_weights(weight_plan(model, folder)):
            owner, _, pname = name.rpartition(".")
            if name == "model.embed_tokens.weight":
                model.model.embed_tokens = Int8Embedding(t)  # rows looked up, so int8 with a scale per row
                if config.tie_word_embeddings:
                    linears["lm_head"].set_int8(t)  # the tied head: the same matrix, packed for the product
            elif owner in linears and pname == "weight":
                linears[owner].set_int8(t)
            else:
                params[name].copy_(t)
    release_heap()
    return model


def release_heap():
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). Reading a model
    tensor by tensor and packing each into a smaller one leaves the freed fp32 reads as holes in the heap, which
    glibc keeps: measured, 1.6-1.9 resident bytes per int8 weight before, 1.04 after."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator does its own thing
        pass


def save_model(model: Qwen2VL, out_dir, state_dict=None, max_shard_bytes=5 * 1024 ** 3, extra_files=None):
    """`model` (or `state_dict`, e.g. gathered from FSDP shards) as an HF checkpoint, with the tokenizer and
    processor files of the checkpoint it came from."""
    save(model.config, model.state_dict() if state_dict is None else state_dict, out_dir, model.source_dir,
         max_shard_bytes, model.generation_eos, extra_files)


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


def save(config: Qwen2VLConfig, state_dict, out_dir, source_dir=None, max_shard_bytes=5 * 1024 ** 3,
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
        cfg = config_to_json(config)
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
