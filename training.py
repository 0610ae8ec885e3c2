"""What both trainers share beyond the process group and sharding (distributed.py): start-up, optimizer groups and
the schedule, checkpoints (training state and the exported model), memory and metrics logging, and launching.

train_sft.py (stages P, S, C) and train_grpo.py (stage R) each hold only their own loop; every check they share
(OUT visible to all ranks, nothing-to-train, resuming into the same schedule) is written once, here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

import checkpoint as CK
import data as D
import model as M
from distributed import (Dist, check_out_shared, full_state_dict, load_sharded, resolve_model, setup_distributed,
                         teardown_distributed)


def freeze(model: M.Qwen2VL, vision=False, merger=False, llm=False):
    """Turn off gradients of the vision tower (without merger), the merger, and/or the LLM (lm_head included)."""
    for name, p in model.named_parameters():
        part = "merger" if name.startswith("visual.merger.") else "vision" if name.startswith("visual.") else "llm"
        if {"vision": vision, "merger": merger, "llm": llm}[part]:
            p.requires_grad_(False)


def param_groups(model, lr: float, merger_lr: float | None = None, vision_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: (llm | merger | vision) x (decay | no decay). Norm weights and biases (1-D) get no decay.
    Frozen parameters are left out. Each group keeps `base_lr` for the schedule and a `name` for logs."""
    lrs = {"llm": lr, "merger": merger_lr if merger_lr is not None else lr,
           "vision": vision_lr if vision_lr is not None else lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "merger" if name.startswith("visual.merger.") else "vision" if name.startswith("visual.") else "llm"
        decay = p.ndim >= 2
        g = groups.setdefault((part, decay), {"name": f"{part}{'' if decay else '_no_decay'}", "params": [],
                                               "lr": lrs[part], "base_lr": lrs[part],
                                               "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr for 0-based optimizer step `step`: linear warmup to 1, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def set_lr(optimizer, factor: float):
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


def clip_grad_norm(params, max_norm: float) -> float:
    """Total gradient norm before clipping (over all shards), clipped in place when max_norm > 0."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def save_final(model, out_dir: str, d: Dist, save_dtype: str | None, start_folder: str, extra_files=None) -> str:
    """OUT/final: the trained model in the HF layout, in `save_dtype` (default: the dtype the starting checkpoint
    was stored in, so a bf16 original comes back bf16, half the size of the fp32 master weights). Collective."""
    sd = full_state_dict(model)
    final = os.path.join(out_dir, "final")
    if d.main:
        dtype = SAVE_DTYPES[save_dtype] if save_dtype else CK.checkpoint_dtype(start_folder)
        for k in list(sd):  # one tensor at a time: each fp32 copy goes as its converted one comes
            if model.config.tie_word_embeddings and k == "lm_head.weight":
                del sd[k]  # the tied head is written once, as the embedding
            elif sd[k].is_floating_point():
                sd[k] = sd[k].to(dtype)
        CK.save_model(model, final, state_dict=sd, extra_files=extra_files)
        print(f"saved {final} ({str(dtype).removeprefix('torch.')})")
    del sd
    dist.barrier()
    return final


def _rng_state() -> dict:
    """Every RNG as tensors and plain values, so that torch.load(weights_only=True) can read it back."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64)}}


def _set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((s["python"]["version"], tuple(s["python"]["state"].tolist()), None))


def save_training_checkpoint(out_dir: str, step: int, model, optimizer, state: dict, d: Dist,
                             keep: int | None = None, extra_files: dict | None = None) -> str:
    """OUT/checkpoint-STEP: the HF-layout model, optimizer.pt (full, unsharded), rng-rank{r}.pt and
    trainer_state.json (`state`: step, schedule, sampler position, ...). Written to a temporary folder that is
    renamed when complete, so a crash never leaves a half checkpoint for --resume. Collective: all ranks call it.
    Multi-node runs need OUT on a shared file system. keep: how many newest checkpoints to keep."""
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = os.path.join(out_dir, f".checkpoint-{step}.tmp")
    sd = full_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        CK.save_model(model, tmp, state_dict=sd, extra_files=extra_files)
        torch.save(osd, os.path.join(tmp, "optimizer.pt"))
    del sd, osd
    dist.barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{d.rank}.pt"))
    dist.barrier()
    if d.main:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**state, "step": step, "world_size": d.world}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        if keep:
            for old in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints in OUT, oldest first (temporary folders of an interrupted save are not listed)."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, n)) for n in os.listdir(out_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", n))
             and os.path.isfile(os.path.join(out_dir, n, "trainer_state.json"))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def resume_point(resume: str | None, out_dir: str, d: Dist) -> str | None:
    """The checkpoint to resume from (--resume: "latest" or a path), decided by rank 0 for every rank, so that all
    ranks enter the collective loads together."""
    box = [latest_checkpoint(out_dir) if resume == "latest" else resume]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_training_checkpoint(path: str, model, optimizer, d: Dist) -> dict:
    """Restore optimizer (rank 0 reads, then it is sharded to all) and this rank's RNG; returns the trainer
    state. The model weights come from the same folder, through load_sharded."""
    osd = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True) if d.main else {}
    set_optimizer_state_dict(model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    rng = os.path.join(path, f"rng-rank{d.rank}.pt")
    if os.path.isfile(rng):  # absent when resuming on more ranks than saved: those start from their seed
        _set_rng_state(torch.load(rng, weights_only=True))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


class PeakMemory:
    """Peak memory since the last reset(), in GiB: CUDA's allocator peak, or on CPU the resident set sampled every
    2 ms by a thread (ru_maxrss is a lifetime peak: useless to compare two phases of one process)."""

    def __init__(self, device):
        self.cuda, self.peak, self.stopped, self._thread = str(device).startswith("cuda"), 0, False, None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self.stopped:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def reset(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists("/proc/self/statm"):
            self.peak = self.rss()
            if self._thread is None:
                self._thread = threading.Thread(target=self._poll, daemon=True)
                self._thread.start()
        return self

    def bytes(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else max(self.peak, self.rss())

    def gb(self) -> float:
        return self.bytes() / 2 ** 30

    def stop(self):
        self.stopped = True

    __enter__ = reset

    def __exit__(self, *exc):
        self.stop()


class MetricsLogger:
    """OUT/metrics.jsonl, one JSON object per optimizer step, and a line on stdout; rank 0 only. On resume, lines
    past the resumed step (written after the checkpoint by the interrupted run) are dropped first."""

    def __init__(self, path: str, enabled: bool, resume_step: int | None = None, write=print):
        self.path, self.enabled, self.write = path, enabled, write
        if enabled and resume_step is not None and os.path.isfile(path):
            with open(path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        elif enabled and resume_step is None and os.path.isfile(path):
            os.remove(path)

    def log(self, rec: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))


def common_args(ap, **defaults):
    """The flags both trainers take; `defaults` sets the stage's own defaults (lr, weight_decay, ...)."""
    d = {"lr": 1e-5, "vision_lr": None, "weight_decay": 0.0, "warmup_ratio": 0.0, **defaults}
    a = ap.add_argument
    a("--model", required=True, help="checkpoint to start from (HF layout): folder or hub id")
    a("--image-root", default=None, help="folder image paths are relative to (default: each data file's folder)")
    a("--out", required=True, help="output folder: metrics.jsonl, checkpoint-STEP/, final/")
    a("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    a("--epochs", type=int, default=1)
    a("--lr", type=float, default=d["lr"], help="LLM learning rate")
    a("--vision-lr", type=float, default=d["vision_lr"], help="vision tower learning rate (default: --lr)")
    a("--weight-decay", type=float, default=d["weight_decay"])
    a("--warmup-ratio", type=float, default=d["warmup_ratio"])
    a("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    a("--min-pixels", type=int, default=512 * 28 * 28)
    a("--max-pixels", type=int, default=1280 * 28 * 28)
    a("--seed", type=int, default=0)
    a("--grad-ckpt", action="store_true", help="activation checkpointing of every layer and vision block")
    a("--compile", action="store_true", help="torch.compile every decoder layer and vision block (before sharding)")
    a("--freeze-vision", action="store_true")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only OUT/final)")
    a("--keep", type=int, default=None, help="keep only the newest K checkpoints")
    a("--resume", nargs="?", const="latest", default=None, help="continue from the newest checkpoint in OUT "
                                                                  "(or the one given)")
    a("--ce-chunk", type=int, default=1024, help="target tokens per chunk of the log-probability computation")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 compute with fp32 master weights and fp32 gradient reduction (default: on CUDA; on CPU it runs "
           "the same policy)")
    a("--save-dtype", choices=sorted(SAVE_DTYPES), default=None,
      help="dtype of OUT/final (default: the dtype --model is stored in); training checkpoints stay fp32 for exact "
           "resumption")


def start_run(args, d: Dist):
    """The start of either stage, on every rank: (processor, checkpoint to resume from or None). Seeds, checks that
    every rank sees OUT, and resolves --model to a local folder (a hub id is fetched once per node)."""
    torch.manual_seed(args.seed)
    check_out_shared(args.out, d)
    args.model = resolve_model(args.model, d)
    proc = D.Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    resume = resume_point(args.resume, args.out, d)
    if args.resume == "latest" and resume is None and d.main:
        print(f"--resume: no checkpoint in {args.out} yet, starting fresh")
    return proc, resume


def build_model(args, d: Dist, resume: str | None, frozen: dict):
    """(sharded model in train mode, AdamW over its trainable parameters, those parameters). `frozen`: freeze()'s
    flags. The weights come from the checkpoint to resume from, else --model."""
    def prepare(m):
        freeze(m, **frozen)
        m.set_grad_checkpointing(args.grad_ckpt)
        if args.compile:  # per block, as FSDP shards them: each compiles once, its gathers stay outside the graph
            for block in [*m.visual.blocks, *m.model.layers]:
                block.compile()
    model = load_sharded(resume or args.model, d, args.bf16, prepare)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SystemExit("everything is frozen: nothing to train")
    groups = param_groups(model, args.lr, getattr(args, "merger_lr", None), args.vision_lr, args.weight_decay)
    return model, torch.optim.AdamW(groups, fused=d.device.type == "cuda"), trainable  # fused: one kernel, GPU


def resume_optimizer(resume: str | None, model, optimizer, d: Dist, schedule: dict) -> int:
    """The step to continue from: 0 for a fresh run, else the checkpoint's, after restoring the optimizer and RNG.
    A checkpoint saved by a run with another `schedule` (total steps, batch size, ...) is refused: resuming it
    would silently train on another schedule and data order."""
    if not resume:
        return 0
    state = load_training_checkpoint(resume, model, optimizer, d)
    other = [f"{k} {state.get(k)} (now {v})" for k, v in schedule.items() if state.get(k) != v]
    if other:
        raise SystemExit(f"{resume} was saved by a run with another schedule: {', '.join(other)}")
    if d.main:
        print(f"resumed from {resume} at step {state['step']}")
    return state["step"]


def processor_files(proc) -> dict:
    """{file name: content} that every checkpoint carries besides the source's files: the preprocessor config with
    the pixel limits this run used (they may differ from the starting checkpoint's)."""
    path = os.path.join(proc.source_dir, "preprocessor_config.json")
    pp = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            pp = json.load(f)
    return {"preprocessor_config.json": json.dumps({**pp, **proc.image_processor.to_dict()}, indent=2)}


def apply_update(optimizer, step: int, total: int, warmup: int, grad_norm: float, last_ckpt, loss=None):
    """Schedule, optimizer step, zero grads. A non-finite loss or gradient norm stops the run before the update,
    naming the step and the last good checkpoint."""
    for name, v in (("loss", loss), ("gradient norm", grad_norm)):
        if v is not None and not math.isfinite(v):
            raise FloatingPointError(f"step {step + 1}: non-finite {name} (loss {loss}, grad_norm {grad_norm}); "
                                     f"stopped before the update. Last good checkpoint: {last_ckpt or 'none'}")
    set_lr(optimizer, lr_factor(step, total, warmup))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Progress:
    """A run's progress on rank 0: the tqdm bar, OUT/metrics.jsonl (see MetricsLogger) and peak memory per step."""

    def __init__(self, out: str, d: Dist, total: int, start: int, resumed: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, disable=not d.main, dynamic_ncols=True)
        self.metrics = MetricsLogger(os.path.join(out, "metrics.jsonl"), d.main, start if resumed else None,
                                     self.bar.write)
        self.memory = PeakMemory(d.device).reset()

    def log(self, rec: dict):
        self.metrics.log({**rec, "peak_mem_gb": self.memory.gb()})
        self.memory.reset()
        self.bar.update(1)

    def close(self):
        self.bar.close()
        self.memory.stop()


def launch(train_fn, args):
    """Run train_fn(args, dist) inside a process group, leaving it cleanly on success and at once on error."""
    d = setup_distributed(args.device)
    if args.bf16 is None:
        args.bf16 = d.device.type == "cuda"
    try:
        out = train_fn(args, d)
    except BaseException:
        teardown_distributed(ok=False)
        raise
    teardown_distributed()
    return out


