"""Speed and memory of our Qwen2-VL against transformers' on the same weights, in one run.

Each trial is a fresh process (so peak memory is that implementation's own), run A B A B ...; the table shows
medians over trials and the ratio ours / transformers. Default: the real Qwen2-VL-2B widths, random weights.

    python bench.py                       # 2B widths, fp32, CPU, one 448x448 image + a question, batch 1
    python bench.py --layers 4 --dtype bfloat16 --json out.json
    python bench.py --device cuda --dtype bfloat16 --batch 16
    python bench.py rollout --layers 8 --group 4    # GRPO rollout: one batched call vs G calls per prompt
    python bench.py train --device cuda --nproc 8  # SFT tokens/s per GPU and MFU, a GRPO step's split
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import checkpoint as CK
import model as M
from training import PeakMemory

ROOT = os.path.dirname(os.path.abspath(__file__))

# Memory bandwidth (TB/s) of the GPUs a decode step is measured against: at batch 1 every generated token reads
# all decoder weights once, so bandwidth / weight bytes is the fastest decode possible (the roofline).
BANDWIDTH_TBS = {"H200": 4.8, "H100 SXM": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.04,
                 "A100": 1.56, "L40S": 0.864}


def decode_roofline(device: str, cfg: M.Qwen2VLConfig, dtype) -> float | None:
    """Tokens/s per row at batch 1 if decoding only streamed the decoder and output-head weights at the GPU's
    bandwidth (None off CUDA or for an unknown GPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    tbs = next((v for k, v in BANDWIDTH_TBS.items() if k in name), None)
    if tbs is None:
        return None
    d, i, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * i
    return tbs * 1e12 / ((L * per_layer + V * d) * torch.empty(0, dtype=dtype).element_size())


def make_checkpoint(folder, layers, vision_depth, dtype, seed=0):
    """Random weights at the 2B widths (the config's defaults), `layers` and `vision_depth` deep, in HF layout."""
    cfg = M.Qwen2VLConfig(num_hidden_layers=layers, vision=M.VisionConfig(depth=vision_depth))
    CK.save_model(M.init_weights(M.Qwen2VL.empty(cfg, dtype), seed), folder)


def inputs(cfg, batch, image_size, text_tokens, device):
    """A chat prompt around one image per row (ids by hand: random weights need no real tokenizer)."""
    from PIL import Image
    from data import ImageProcessor
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 255, (image_size, image_size, 3), generator=g, dtype=torch.uint8).numpy())
    pv, thw = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)([img] * batch)
    n = int(thw[0].prod()) // 4
    text = torch.randint(0, 150000, (text_tokens,), generator=g).tolist()
    row = [151644, 872, 198, cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    row += text + [151645, 198, 151644, 77091, 198]
    ids = torch.tensor([row] * batch, device=device)
    return ids, torch.ones_like(ids), pv.to(device), thw.to(device)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child(a):
    """One trial of one implementation; prints a JSON line."""
    torch.manual_seed(0)
    dtype, dev = M.DTYPES[a.dtype], a.device
    ids, mask, pv, thw = None, None, None, None
    if a.impl.startswith("ours"):  # ours, ours-int8 (CPU), ours-bfloat16 ...: one run can A/B them all
        variant = a.impl.partition("-")[2]
        m = CK.load(a.ckpt, dtype=M.DTYPES.get(variant, dtype), device=dev,
                    quantize="int8" if variant == "int8" else None)
        if a.compile:  # what generate repeats; a CUDA graph on GPU
            m.compile_decode("reduce-overhead" if dev.startswith("cuda") else None)

        def gen(n):
            return m.generate(ids, mask, pv, thw, max_new_tokens=n, eos_token_ids=[])
    else:
        from transformers import Qwen2VLForConditionalGeneration
        m = Qwen2VLForConditionalGeneration.from_pretrained(a.ckpt, dtype=dtype, attn_implementation="sdpa").to(dev)
        m.eval()
        import inspect
        takes_mm = "mm_token_type_ids" in inspect.signature(m.forward).parameters  # transformers >= 5

        def gen(n):
            kw = {"mm_token_type_ids": (ids == m.config.image_token_id).int()} if takes_mm else {}
            with torch.inference_mode():
                return m.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw,
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, **kw)
    cfg = CK.config_from_json(json.load(open(os.path.join(a.ckpt, "config.json"))))
    ids, mask, pv, thw = inputs(cfg, a.batch, a.image_size, a.text_tokens, dev)
    # Warm-up. A compiled step's static cache is sized by the new tokens, so it warms up at the measured length
    # (2 tokens made it recompile inside the timing); eager runs need no more than a short call.
    gen(a.new_tokens if a.compile else 2)
    prefill, total = [], []
    with PeakMemory(dev) as mem:
        for _ in range(a.reps):
            sync(dev)
            t = time.perf_counter()
            gen(1)
            sync(dev)
            prefill.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = gen(a.new_tokens)
            sync(dev)
            total.append(time.perf_counter() - t)
    assert out.shape[-1] >= a.new_tokens
    p, tt = statistics.median(prefill), statistics.median(total)
    print(json.dumps({"impl": a.impl, "prefill_s": p, "decode_tok_s": a.batch * (a.new_tokens - 1) / max(tt - p, 1e-9),
                      "peak_mem_gb": mem.bytes() / 1e9, "prompt_tokens": ids.shape[1],
                      "roofline_tok_s": decode_roofline(dev, cfg, dtype)}))


def rollout_bench(a):
    """G completions per prompt from one generate(num_samples=G) call, against the public reference's way: one
    generate call per completion, each re-encoding the prompt and its image. Same model, same process."""
    dtype, dev = M.DTYPES[a.dtype], a.device
    tmp = tempfile.mkdtemp(prefix="bench-rollout-")
    try:
        make_checkpoint(os.path.join(tmp, "m"), a.layers, a.vision_depth, dtype)
        m = CK.load(os.path.join(tmp, "m"), dtype=dtype, device=dev)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ids, mask, pv, thw = inputs(m.config, a.batch, a.image_size, a.text_tokens, dev)
    per_image = int(thw[0].prod())

    def batched():
        return m.generate(ids, mask, pv, thw, max_new_tokens=a.new_tokens, temperature=1.0, num_samples=a.group,
                          eos_token_ids=[])

    def one_at_a_time():
        for b in range(a.batch):
            for _ in range(a.group):
                m.generate(ids[b:b + 1], mask[b:b + 1], pv[b * per_image:(b + 1) * per_image], thw[b:b + 1],
                           max_new_tokens=a.new_tokens, temperature=1.0, eos_token_ids=[])
    res = {}
    for name, fn in [("batched", batched), ("one_at_a_time", one_at_a_time)] * 2:  # A B A B
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        res.setdefault(name, []).append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in res.items()}
    out["speedup"] = out["one_at_a_time"] / out["batched"]
    out["tokens"] = a.batch * a.group * a.new_tokens
    print(f"{a.batch} prompts x G={a.group}, {a.new_tokens} new tokens each: batched {out['batched']:.2f} s, "
          f"one call per completion {out['one_at_a_time']:.2f} s -> {out['speedup']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


def train_bench(a):
    """Short runs of train_sft.py (packed, activation checkpointing; bf16 on GPU) and train_grpo.py on the synthetic
    world's data, at the 2B widths (a.layers / a.vision_depth deep; the vocabulary is the synthetic tokenizer's, so
    the output head is smaller than the real 152k rows): SFT tokens/s per rank and MFU (known GPUs), and where a
    GRPO step's time goes (rollout, scoring, update). Medians over the steps after the first."""
    import synth
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    try:
        data, ckpt = os.path.join(tmp, "synth"), os.path.join(tmp, "model")
        synth.write_synth(data, 0, n_pretrain=4, n_sft=max(64, a.steps * a.global_batch), n_grpo=64, n_eval=4)
        synth.write_tiny(ckpt, hidden=1536, layers=a.layers, heads=12, kv_heads=2, intermediate=8960,
                         vision_depth=a.vision_depth, vision_dim=1280, vision_heads=16)
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                        f"--nproc_per_node={a.nproc}"] if a.nproc > 1 else [])
        common = ["--model", ckpt, "--image-root", data, "--max-steps", str(a.steps), "--device", a.device,
                  "--grad-ckpt"]
        runs = {"sft": [os.path.join(ROOT, "train_sft.py"), *common, "--data", os.path.join(data, "sft.json"),
                        "--out", os.path.join(tmp, "sft"), "--global-batch", str(a.global_batch), "--micro-batch",
                        str(a.global_batch // a.nproc), "--pack", "--no-balance"],
                "grpo": [os.path.join(ROOT, "train_grpo.py"), *common, "--data", os.path.join(data, "grpo.jsonl"),
                         "--out", os.path.join(tmp, "grpo"), "--prompts-per-step", str(a.nproc * a.batch),
                         "--num-generations", str(a.group), "--max-completion-len", str(a.new_tokens)]}
        summary = {}
        for name, cmd in runs.items():
            out = subprocess.run(launcher + cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name} run failed:\n{out.stderr[-3000:]}")
            with open(os.path.join(tmp, name, "metrics.jsonl")) as f:
                steps = [json.loads(line) for line in f][1:] or [{}]
            keys = ("tokens_per_s", "mfu", "step_s", "peak_mem_gb") if name == "sft" else (
                "rollout_s", "scoring_s", "update_s", "rollout_tokens_per_s", "peak_mem_gb")
            summary[name] = {k: statistics.median(s[k] for s in steps) for k in keys if k in steps[0]}
        summary["sft"]["tokens_per_s_per_rank"] = summary["sft"].pop("tokens_per_s") / a.nproc
        print(json.dumps(summary, indent=2))
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    import sys as _sys
    argv = _sys.argv[1:] if argv is None else argv
    mode = argv[0] if argv[:1] in (["rollout"], ["train"]) else None
    argv = argv[1:] if mode else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28, help="decoder layers (2B: 28)")
    ap.add_argument("--vision-depth", type=int, default=32, help="vision blocks (2B: 32)")
    ap.add_argument("--dtype", default="float32", choices=list(M.DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1, help="prompts per batch (decode tokens/s counts all rows)")
    ap.add_argument("--image-size", type=int, default=448, help="square image side in pixels (448 -> 256 tokens)")
    ap.add_argument("--text-tokens", type=int, default=32, help="question tokens after the image")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the decode measurement")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions inside each trial (median)")
    ap.add_argument("--trials", type=int, default=2, help="fresh processes per implementation, run A B A B")
    ap.add_argument("--impls", default="ours,transformers", help="which implementations to run: ours, transformers, "
                                                                  "ours-int8 (CPU), ours-bfloat16, ...")
    ap.add_argument("--compile", action="store_true", help="compile our decode step (a CUDA graph on GPU)")
    ap.add_argument("--ckpt", default=None, help="an existing checkpoint instead of random 2B-width weights")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--group", type=int, default=4, help="rollout, train: completions per prompt (G)")
    ap.add_argument("--steps", type=int, default=4, help="train: optimizer steps of each run")
    ap.add_argument("--global-batch", type=int, default=16, help="train: SFT samples per step")
    ap.add_argument("--nproc", type=int, default=1, help="train: ranks (torchrun)")
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)  # internal: run one trial
    a = ap.parse_args(argv)
    if mode == "rollout":
        return rollout_bench(a)
    if mode == "train":
        return train_bench(a)
    if a.impl:
        return child(a)

    tmp = None
    if a.ckpt is None:
        tmp = tempfile.mkdtemp(prefix="bench-ckpt-")
        a.ckpt = os.path.join(tmp, "model")
        print(f"writing random weights ({a.layers} layers, vision depth {a.vision_depth}, {a.dtype}) ...", flush=True)
        make_checkpoint(a.ckpt, a.layers, a.vision_depth, M.DTYPES[a.dtype])
    try:
        impls = [i.strip() for i in a.impls.split(",")]
        results = {i: [] for i in impls}
        for trial in range(a.trials):
            for impl in impls:  # A B A B: drift in machine state hits both alike
                cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--ckpt", a.ckpt]
                for k in ("dtype", "device", "batch", "image_size", "text_tokens", "new_tokens", "reps"):
                    cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
                cmd += ["--compile"] if a.compile else []
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{impl} trial failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[impl].append(r)
                print(f"trial {trial + 1} {impl:>12}: prefill {r['prefill_s']:.3f} s, decode "
                      f"{r['decode_tok_s']:.2f} tok/s, peak {r['peak_mem_gb']:.2f} GB", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = {"config": {k: getattr(a, k) for k in ("layers", "vision_depth", "dtype", "device", "batch",
                                                     "image_size", "new_tokens", "trials", "reps")},
               "torch": torch.__version__}
    for impl, rs in results.items():
        summary[impl] = {k: statistics.median(r[k] for r in rs) for k in ("prefill_s", "decode_tok_s", "peak_mem_gb")}
    print(f"\n| {'':12} | prefill s | decode tok/s | peak mem GB |\n|---|---|---|---|")
    for impl in impls:
        s = summary[impl]
        print(f"| {impl:12} | {s['prefill_s']:.3f} | {s['decode_tok_s']:.2f} | {s['peak_mem_gb']:.2f} |")
    roof = results[impls[0]][0].get("roofline_tok_s")
    if roof:  # at batch B the weights are read once for B rows: B x the batch-1 roofline, until compute binds
        summary["roofline_tok_s"] = roof * a.batch
        print("decode vs the bandwidth roofline (" + f"{roof * a.batch:.0f} tok/s): " + ", ".join(
            f"{i} {summary[i]['decode_tok_s'] / (roof * a.batch):.0%}" for i in impls))
    for x, y in [("ours", "transformers")] + [(i, "ours") for i in impls if i.startswith("ours-")]:
        if x in summary and y in summary:  # each variant of ours against ours, ours against transformers
            o, t = summary[x], summary[y]
            r = summary.setdefault("ratio", {})[f"{x}/{y}"] = {
                "prefill_speedup": t["prefill_s"] / o["prefill_s"], "decode_speedup": o["decode_tok_s"] / t[
                    "decode_tok_s"], "peak_mem": o["peak_mem_gb"] / t["peak_mem_gb"]}
            print(f"| {x}/{y} | {r['prefill_speedup']:.2f}x faster | {r['decode_speedup']:.2f}x | "
                  f"{r['peak_mem']:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
