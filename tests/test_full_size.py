"""The real Qwen2-VL-2B widths: builds, saves sharded, loads within the memory budget, answers an image prompt."""
import json
import os
import subprocess
import sys
import textwrap

import torch

import checkpoint as CK
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Qwen2-VL-2B-Instruct's config.json as released (original flat layout).
QWEN2VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 1536,
    "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def test_parameter_count_equals_transformers():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    cfg = CK.config_from_json(QWEN2VL_2B)
    with torch.device("meta"):
        ours = M.Qwen2VL(cfg)
        theirs = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**QWEN2VL_2B))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs == 2_208_985_600


LOAD_AND_ANSWER = textwrap.dedent("""
    import json, resource, sys, time, torch
    sys.path.insert(0, ROOT)
    import checkpoint as CK
    from data import ImageProcessor
    from PIL import Image
    torch.manual_seed(0)
    def rss():  # current resident set, bytes
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    base = rss()
    t = time.time()
    m = CK.load(CKPT, dtype=torch.float32)
    load_s = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    img = Image.fromarray(torch.randint(0, 255, (448, 448, 3), dtype=torch.uint8).numpy())
    pv, thw = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)([img])
    c = m.config
    n = int(thw.prod()) // 4
    ids = [151644, 872, 198, c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id, 3838, 30,
           151645, 198, 151644, 77091, 198]
    new = m.generate(torch.tensor([ids]), None, pv, thw, max_new_tokens=3, eos_token_ids=[])
    print(json.dumps({"grid": thw.tolist(), "new": new.tolist(), "size": size, "peak_over_base": peak - base,
                      "load_s": load_s}))
""")


def test_full_2b_builds_loads_sharded_and_answers_an_image(tmp_path):
    m = M.init_weights(M.Qwen2VL.empty(CK.config_from_json(QWEN2VL_2B), torch.bfloat16))
    ckpt = tmp_path / "qwen2vl-2b-random"
    CK.save_model(m, ckpt, max_shard_bytes=1024 ** 3)
    del m
    index = json.load(open(ckpt / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) >= 4
    # a fresh process: its peak RSS is the loader's own
    code = f"ROOT = {ROOT!r}\nCKPT = {str(ckpt)!r}\n" + LOAD_AND_ANSWER
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["grid"] == [[1, 32, 32]]  # 448x448 -> 32x32 patches -> 256 image tokens
    assert len(r["new"][0]) == 3 and all(0 <= t < 151936 for t in r["new"][0])
    assert r["size"] == 2_208_985_600 * 4
    # bf16 file into an fp32 model: the loader holds the model plus about one tensor, not a second copy
    assert r["peak_over_base"] <= 1.3 * r["size"], r
