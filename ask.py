"""Ask a Qwen2-VL / TinyRS model about one or more images, from the command line.

    python ask.py --model Qwen/Qwen2-VL-2B-Instruct --image scene.png "How many ships are there?"
    python ask.py --model runs/R/final --image scene.png --system "$(python -c 'import data; \
        print(data.REASONING_SYSTEM_PROMPT)')" "Where is the airport?"
"""
from __future__ import annotations

import argparse

import torch

import checkpoint as CK
from data import Processor, load_image
from model import DTYPES, pick_dtype


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--quantize", choices=["int8"], default=None,
                    help="int8 weights for CPU decoding (a quarter of fp32's weight bytes per token)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    images = [load_image(p) for p in a.image]
    proc = Processor.from_pretrained(a.model, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    model = CK.load(a.model, dtype=pick_dtype(a.dtype, a.device), device=a.device, quantize=a.quantize)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": a.question}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                    system_prompt=a.system)
    batch = proc(text=[text], images=images or None)
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    new = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                         max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                         generator=g)
    answer = proc.decode(new[0], skip_special_tokens=True)
    print(answer)
    return answer


if __name__ == "__main__":
    main()
