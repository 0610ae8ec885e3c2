"""Stages P, S and C of TinyRS (pre-training, instruction SFT, CoT SFT): one supervised loop on FSDP2, written out.

    torchrun --nproc_per_node=8 train_sft.py --stage sft --model runs/pretrain/final --data vhm_instruct.json \
        --image-root images --out runs/sft --global-batch 16 --micro-batch 2 --grad-ckpt
    python train_sft.py ...        # one process: a process group of one, the same code path

The loss is the mean cross-entropy over every label token of the global batch (all micro-batches, all ranks),
computed at label positions only, in checkpointed chunks (model.forward(targets=...)).

train_grpo.py reuses: setup_distributed, teardown_distributed, check_out_shared, resolve_model, load_sharded,
shard_model, freeze, param_groups, lr_factor, set_lr, clip_grad_norm, full_state_dict, save_final,
save_training_checkpoint, resume_point, load_training_checkpoint, MetricsLogger, peak_memory_gb.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import shutil
import socket
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import data as D
import model as M

# Stage defaults (a flag given on the command line wins): --stage changes defaults only, never the loop.
STAGES = {
    "pretrain": dict(balance=False, system_prompt=None),
    "sft": dict(balance=True, system_prompt=None),
    "cot": dict(balance=True, system_prompt=D.REASONING_SYSTEM_PROMPT),  # the prompt GRPO trains with
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


# ----------------------------------------------------------------------------------------------------------------
# Reusable pieces


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join torchrun's process group, or make a group of one (plain `python`): FSDP runs the same either way.

    NCCL on GPU, gloo on CPU (FSDP2's all-gather and reduce-scatter work on gloo in torch >= 2.6)."""
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=dev if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def teardown_distributed(ok: bool = True):
    """Leave the process group. ok=False after an error: no barrier, as the other ranks may never reach it."""
    if dist.is_initialized():
        if ok:
            dist.barrier()  # gloo can abort at exit when one rank tears down while another still talks
        dist.destroy_process_group()


def stop_together(d: Dist, err: str | None):
    """SystemExit on every rank when any rank met an error (`err`): no rank is left waiting in a collective."""
    errs = [None] * d.world
    dist.all_gather_object(errs, err)
    if any(errs):
        raise SystemExit(next(e for e in errs if e))


def check_out_shared(out: str, d: Dist):
    """Every rank must see what rank 0 writes in OUT: a checkpoint holds files from every rank, and --resume reads
    it on every rank. A multi-node run whose OUT is not one shared file system would fail late, or hang in a
    collective that only some ranks enter; this stops every rank at start instead, saying so."""
    probe = os.path.join(out, f".shared-check-{os.getpid()}")  # as each rank will resolve OUT, relative or not
    token, err = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}", None
    if d.main:
        try:
            os.makedirs(out, exist_ok=True)
            with open(probe, "w") as f:
                f.write(token)
        except OSError as e:
            err = f"--out {out}: cannot write there ({e})"
    stop_together(d, err)
    box = [probe, token]
    dist.broadcast_object_list(box, src=0)
    for attempt in range(5):  # a shared file system may show a new file a moment late (attribute caching)
        try:
            with open(box[0]) as f:
                seen = f.read() == box[1]
        except OSError:
            seen = False
        if seen or attempt == 4:
            break
        time.sleep(1)
    views = [None] * d.world
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if d.main:
        os.remove(probe)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise SystemExit(f"--out {out}: {', '.join(blind)} cannot see the files rank 0 writes there. A run on "
                         f"several nodes needs OUT on a file system that every node mounts at the same path (NFS, "
                         f"Lustre, ...): point --out there.")


def resolve_model(path: str, d: Dist) -> str:
    """A local checkpoint folder for a folder or hub id. A hub id is downloaded once per node, by its local rank 0;
    the other ranks then read that copy from the cache. Errors stop every rank (no one is left waiting)."""
    here = [None] * d.world
    dist.all_gather_object(here, os.path.isdir(path))
    if all(here):
        return path
    if any(here):
        raise SystemExit(f"--model {path}: a folder on ranks {[r for r, h in enumerate(here) if h]} but not on "
                         f"ranks {[r for r, h in enumerate(here) if not h]}: give a folder every node sees, or a "
                         f"hub id")
    err = None
    if d.local_rank == 0:
        try:
            M.resolve_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - reported on every rank
            err = str(e)
    stop_together(d, err)
    return M.resolve_checkpoint(path, local_files_only=True)


def load_sharded(folder: str, d: Dist, bf16: bool, prepare=None) -> M.Qwen2VL:
    """The checkpoint in `folder` as an FSDP-sharded model, without a full copy of the weights in any process:
    every rank builds the model on the meta device and shards it; rank 0 reads the checkpoint one tensor at a time
    and broadcasts it, and each rank keeps its shard of it. Peak host memory per rank: its shards plus one
    tensor. `prepare(model)` runs before sharding (freezing, activation checkpointing)."""
    model, plan, err = None, None, None
    try:
        model = M.Qwen2VL.from_pretrained(folder, torch.float32, "meta")  # structure and settings: every rank
        if d.main:
            plan = M.weight_plan(model, folder)  # headers only: a bad checkpoint stops every rank before any read
    except Exception as e:  # noqa: BLE001 - reported on every rank
        err = f"{folder}: {type(e).__name__}: {e}"
    stop_together(d, err)
    order = [(wanted[raw], header[raw]["dtype"]) for _, (header, _), wanted in plan or []
             for raw in sorted(wanted, key=lambda r: header[r]["data_offsets"][0])]  # read_weights' order
    box = [order]
    dist.broadcast_object_list(box, src=0)
    if prepare is not None:
        prepare(model)
    shard_model(model, d, bf16)
    model.to_empty(device=d.device)
    params = dict(model.named_parameters())
    weights = M.read_weights(plan) if d.main else None
    with torch.no_grad():
        for name, dtype in box[0]:
            p = params[name]
            if d.main:
                got, t = next(weights)
                assert got == name, (got, name)
                t = t.to(d.device)
            else:
                t = torch.empty(p.shape, dtype=M.SAFETENSORS_DTYPES[dtype], device=d.device)
            dist.broadcast(t, src=0)  # in the file's dtype: a bf16 checkpoint travels at half the bytes
            part = t.chunk(d.world)  # FSDP2 shards dim 0 as torch.chunk cuts it (late ranks may get nothing)
            if d.rank < len(part):
                p.to_local().copy_(part[d.rank])
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("the tied lm_head lost its tie while sharding")
    return model


def shard_model(model: M.Qwen2VL, d: Dist, bf16: bool | None = None) -> M.Qwen2VL:
    """FSDP2: every vision block and decoder layer is its own unit (gathered just before use, freed after), the
    root holds the rest (embeddings, lm_head, norms, patch embedding, merger). bf16 compute with fp32 master
    weights and gradient reductions on GPU by default; plain fp32 on CPU."""
    bf16 = d.device.type == "cuda" if bf16 is None else bf16
    mesh = init_device_mesh(d.device.type, (d.world,))
    # cast_forward_inputs=False: the model sets every dtype itself, exactly as the plain bf16 model does (FSDP's
    # cast would round the vision tower's fp32 rotary tables to bf16, and rebuild every layer's inputs).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16 else MixedPrecisionPolicy()
    for unit in [*model.visual.blocks, *model.model.layers]:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


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


def full_state_dict(model) -> dict:
    """The whole model's tensors on CPU on rank 0 (an empty dict on other ranks). Every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def save_final(model, out_dir: str, d: Dist, save_dtype: str | None, start_folder: str, extra_files=None) -> str:
    """OUT/final: the trained model in the HF layout, in `save_dtype` (default: the dtype the starting checkpoint
    was stored in, so a bf16 original comes back bf16, half the size of the fp32 master weights). Collective."""
    sd = full_state_dict(model)
    final = os.path.join(out_dir, "final")
    if d.main:
        dtype = SAVE_DTYPES[save_dtype] if save_dtype else M.checkpoint_dtype(start_folder)
        for k in list(sd):  # one tensor at a time: each fp32 copy goes as its converted one comes
            if model.config.tie_word_embeddings and k == "lm_head.weight":
                del sd[k]  # the tied head is written once, as the embedding
            elif sd[k].is_floating_point():
                sd[k] = sd[k].to(dtype)
        M.save_checkpoint(model.config, sd, final, source_dir=model.source_dir, generation_eos=model.generation_eos,
                          extra_files=extra_files)
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
        M.save_checkpoint(model.config, sd, tmp, source_dir=model.source_dir, generation_eos=model.generation_eos,
                          extra_files=extra_files)
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


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset, or on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


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


# ----------------------------------------------------------------------------------------------------------------
# The loop


def make_batch(samples, pad_id, pack_len, config):
    """collate + M-RoPE positions, in the loader's workers (rope_index is a Python loop over rows)."""
    b = D.collate(samples, pad_id, pack_len)
    b["position_ids"], _ = M.rope_index(b["input_ids"], b["attention_mask"], b["image_grid_thw"], config)
    return b


def step_flops(batch, n_llm: int, n_vision: int, cfg: M.Qwen2VLConfig) -> float:
    """Model FLOPs of forward + backward (6 per parameter and token, plus causal attention), for MFU."""
    tokens = int((batch["attention_mask"] > 0).sum())
    patches = int(batch["image_grid_thw"].prod(-1).sum()) if batch["image_grid_thw"] is not None else 0
    seg = batch["attention_mask"]
    lens = torch.stack([(seg == k).sum(-1) for k in range(1, int(seg.max()) + 1)]).flatten().float()
    attn = 6 * cfg.num_hidden_layers * cfg.hidden_size * float((lens ** 2).sum())
    return 6.0 * (n_llm * tokens + n_vision * patches) + attn


def forward_logprobs(model, batch, targets, chunk, sync_vision=False):
    """log p(target) at every position (0 where there is none): the only model call of the loop."""
    dev = targets.device
    on = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return model(on["input_ids"], on["attention_mask"], on["pixel_values"], on["image_grid_thw"],
                 position_ids=on["position_ids"], targets=targets, chunk_size=chunk, sync_vision=sync_vision)


def accumulate_gradients(model, micro, d: Dist, chunk: int) -> tuple[float, float]:
    """Forward and backward over this rank's micro-batches of one global batch. The gradients come out as those
    of the mean cross-entropy over every label token of the global batch (all micro-batches, all ranks): the
    label tokens are counted and summed over ranks first, then each token's loss is divided by that count.
    Returns (this rank's summed token losses, the global label-token count)."""
    targets = [F.pad(b["labels"][:, 1:], (0, 1), value=D.IGNORE_INDEX).to(d.device) for b in micro]
    n = torch.tensor(float(sum(int((t != D.IGNORE_INDEX).sum()) for t in targets)), device=d.device)
    dist.all_reduce(n)
    n = n.clamp(min=1.0)  # a batch of blanked samples only (--skip-bad) has no label: its gradient is zero
    # A micro-batch runs the vision tower on every rank if it has images on any (text-only samples exist).
    images = torch.tensor([float(b["pixel_values"] is not None) for b in micro], device=d.device)
    dist.all_reduce(images, op=dist.ReduceOp.MAX)
    loss_sum = torch.zeros((), device=d.device)
    for b, tgt, any_images in zip(micro, targets, images.tolist()):
        logp = forward_logprobs(model, b, tgt, chunk, sync_vision=any_images > 0)
        if logp.requires_grad:  # not when nothing trainable was used on any rank (--freeze-llm, no image anywhere)
            (-logp.sum() * (d.world / n)).backward()  # * world: FSDP averages the ranks' gradients
        loss_sum += -logp.detach().sum()
    return float(loss_sum), float(n)


def train(args, d: Dist):
    log = print if d.main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    check_out_shared(args.out, d)
    args.model = resolve_model(args.model, d)
    proc = D.Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    ds = D.ConversationDataset(args.data, proc, args.image_root, args.max_len, args.system_prompt, args.skip_bad)
    log(f"data: {len(ds)} samples; {ds.stats}" + (f"; first skipped: {ds.bad_examples[0]}" if ds.bad_examples else ""))
    if ds.stats["repeated"] and args.balance:
        log(f"warning: {ds.stats['repeated']} records repeat an earlier one (an oversampled file, such as TinyRS's "
            f"*_oversampled.json?); balancing replicates them again: pass --no-balance")
    factors = D.balance_factors(ds.tasks, args.balance_max) if args.balance else None
    before = {t: ds.tasks.count(t) for t in sorted(set(ds.tasks))}
    after = D.balanced_counts(ds.tasks, factors) if factors else before
    log(f"tasks per epoch: {before}" + (f" -> balanced (cap {args.balance_max}x): {after}" if factors else ""))
    steps_per_epoch = sum(after.values()) // args.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{sum(after.values())} samples per epoch make no global batch of {args.global_batch}")
    total = args.max_steps or args.epochs * steps_per_epoch
    warmup = math.ceil(args.warmup_ratio * total)

    resume = resume_point(args.resume, args.out, d)
    if args.resume == "latest" and resume is None:
        log(f"--resume: no checkpoint in {args.out} yet, starting fresh")

    def prepare(m):
        freeze(m, args.freeze_vision, args.freeze_merger, args.freeze_llm)
        m.set_grad_checkpointing(args.grad_ckpt)
    model = load_sharded(resume or args.model, d, args.bf16, prepare)
    n_llm = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual."))
    n_vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SystemExit("everything is frozen: nothing to train")
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.merger_lr, args.vision_lr, args.weight_decay),
                                  betas=(0.9, 0.999), eps=1e-8)
    start = 0
    if resume:
        state = load_training_checkpoint(resume, model, optimizer, d)
        if state["total_steps"] != total or state["global_batch"] != args.global_batch:
            raise SystemExit(f"{resume} was saved by a run of {state['total_steps']} steps with global batch "
                             f"{state['global_batch']}, not {total} and {args.global_batch}")
        start = state["step"]
        log(f"resumed from {resume} at step {start}")
    os.makedirs(args.out, exist_ok=True)
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, disable=not d.main, dynamic_ncols=True)
    metrics = MetricsLogger(os.path.join(args.out, "metrics.jsonl"), d.main, start if resume else None, bar.write)
    pp_file = os.path.join(proc.source_dir, "preprocessor_config.json")
    pp = D._read_json(pp_file) if os.path.isfile(pp_file) else {}
    pp = json.dumps({**pp, **proc.image_processor.to_dict()}, indent=2)  # checkpoints keep the pixel limits used

    pack_len = (args.pack_len or args.max_len) if args.pack else None
    if pack_len is not None and pack_len < args.max_len:
        raise SystemExit(f"--pack-len {pack_len} is shorter than --max-len {args.max_len}: a sample would not fit")
    collate_fn = partial(make_batch, pad_id=proc.pad_id, pack_len=pack_len, config=model.config)
    peak = None
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    last_ckpt = resume
    step = start
    while step < total:
        epoch, first = divmod(step, steps_per_epoch)
        order = D.epoch_order(ds.tasks, epoch, args.seed, factors)
        plan = D.rank_steps(order, args.global_batch, args.micro_batch, d.rank, d.world, ds.lengths)
        plan = plan[first:min(len(plan), first + total - step)]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=[mb for s in plan for mb in s], collate_fn=collate_fn,
                                             num_workers=args.workers, pin_memory=d.device.type == "cuda")
        batches = iter(loader)
        for _ in plan:
            t0 = time.perf_counter()
            if d.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(d.device)
            micro = [next(batches) for _ in range(len(plan[0]))]
            skipped = [why for b in micro for why in b["skipped"]]
            for why in skipped:  # printed by the rank that met it
                print(f"skipped (--skip-bad), image unreadable: {why}", flush=True)
            loss_sum, n_labels = accumulate_gradients(model, micro, d, args.ce_chunk)
            grad_norm = clip_grad_norm(trainable, args.max_grad_norm)
            tokens = sum(int((b["attention_mask"] > 0).sum()) for b in micro)
            slots = sum(b["input_ids"].numel() for b in micro)
            flops = sum(step_flops(b, n_llm, n_vision, model.config) for b in micro) if peak else 0.0
            totals = torch.tensor([float(loss_sum), float(tokens), flops, float(slots), float(len(skipped))],
                                  device=d.device, dtype=torch.float64)
            dist.all_reduce(totals)
            loss = float(totals[0]) / n_labels
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                    f"(loss {loss}, grad_norm {grad_norm}); stopped before the update. "
                    f"Last good checkpoint: {last_ckpt or 'none'}")
            set_lr(optimizer, lr_factor(step, total, warmup))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            rec = {"step": step, "epoch": epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": grad_norm, "label_tokens": int(n_labels), "tokens": int(totals[1]),
                   "tokens_per_s": float(totals[1]) / dt, "pad_frac": 1 - float(totals[1] / totals[3]), "step_s": dt,
                   "peak_mem_gb": peak_memory_gb(d.device), "skipped": int(totals[4])}
            if peak:
                rec["mfu"] = float(totals[2]) / dt / (peak * 1e12 * d.world)
            metrics.log(rec)
            bar.update(1)
            if args.save_every and step % args.save_every == 0 and step < total:
                last_ckpt = save_training_checkpoint(
                    args.out, step, model, optimizer,
                    {"total_steps": total, "warmup_steps": warmup, "global_batch": args.global_batch,
                     "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch, "seed": args.seed,
                     "args": vars(args)}, d, args.keep, {"preprocessor_config.json": pp})
            if args.stop_after and step - start >= args.stop_after and step < total:
                log(f"stopping after {args.stop_after} steps at step {step} (--stop-after); --resume continues")
                bar.close()
                return None
    bar.close()
    return save_final(model, args.out, d, args.save_dtype, args.model, {"preprocessor_config.json": pp})


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--model", required=True, help="checkpoint folder (HF layout) or hub id to start from")
    a("--data", required=True, action="append", help="conversation file (JSON list or JSONL); repeatable")
    a("--image-root", default=None, help="folder image paths are relative to (default: each data file's folder)")
    a("--out", required=True, help="output folder: metrics.jsonl, checkpoint-STEP/, final/")
    a("--stage", choices=sorted(STAGES), default="sft", help="picks defaults: system prompt, task balancing")
    a("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    a("--epochs", type=int, default=1)
    a("--global-batch", type=int, default=16, help="samples per optimizer step, over all ranks")
    a("--micro-batch", type=int, default=1, help="samples per forward on one rank")
    a("--lr", type=float, default=1e-5, help="LLM learning rate")
    a("--merger-lr", type=float, default=None, help="default: --lr")
    a("--vision-lr", type=float, default=2e-6)
    a("--weight-decay", type=float, default=0.1)
    a("--warmup-ratio", type=float, default=0.03)
    a("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    a("--max-len", type=int, default=4096, help="tokens per sample (and per packed row)")
    a("--min-pixels", type=int, default=512 * 28 * 28)
    a("--max-pixels", type=int, default=1280 * 28 * 28)
    a("--seed", type=int, default=0)
    a("--pack", action="store_true", help="pack each micro-batch's samples into as few rows as fit --pack-len")
    a("--pack-len", type=int, default=None, help="tokens per packed row (default --max-len); shorter rows cost "
                                                  "less attention, as a packed row attends densely under its mask")
    a("--grad-ckpt", action="store_true", help="activation checkpointing of every layer and vision block")
    a("--freeze-vision", action="store_true")
    a("--freeze-merger", action="store_true")
    a("--freeze-llm", action="store_true")
    a("--balance", action=argparse.BooleanOptionalAction, default=None, help="default: on for sft and cot")
    a("--balance-max", type=float, default=5.0, help="most times a task is replicated per epoch")
    a("--system-prompt", default=None, help="default: the checkpoint's; cot: the reasoning prompt")
    a("--skip-bad", action="store_true", help="skip and count bad records (at the scan) and images that fail to "
                                               "decode during training (logged, 'skipped' in metrics) instead of "
                                               "stopping")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only OUT/final)")
    a("--keep", type=int, default=None, help="keep only the newest K checkpoints")
    a("--resume", nargs="?", const="latest", default=None, help="continue from the newest checkpoint in OUT "
                                                                  "(or the one given)")
    a("--stop-after", type=int, default=None, help="stop after N steps of this run, as an interruption would")
    a("--workers", type=int, default=2, help="data-loader processes per rank")
    a("--ce-chunk", type=int, default=1024, help="label tokens per chunk of the cross-entropy")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_precision_args(ap)
    a("--peak-tflops", type=float, default=None, help="GPU peak bf16 TFLOP/s for MFU (known GPUs are detected)")
    args = ap.parse_args(argv)
    for k, v in STAGES[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def add_precision_args(ap):
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 compute with fp32 master weights and fp32 gradient reduction (default: on CUDA; "
                         "on CPU it runs the same policy)")
    ap.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default=None,
                    help="dtype of OUT/final (default: the dtype --model is stored in); training checkpoints "
                         "stay fp32 for exact resumption")


def launch(train_fn, args):
    """Run train_fn(args, dist) inside a process group, leaving it cleanly on success and at once on error."""
    d = setup_distributed(args.device)
    if getattr(args, "bf16", False) is None:
        args.bf16 = d.device.type == "cuda"
    try:
        out = train_fn(args, d)
    except BaseException:
        teardown_distributed(ok=False)
        raise
    teardown_distributed()
    return out


def main(argv=None):
    return launch(train, parse_args(argv))


if __name__ == "__main__":
    main()
