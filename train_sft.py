"""Stages P, S and C of TinyRS (pre-training, instruction SFT, CoT SFT): one supervised loop on FSDP2, written out.

    torchrun --nproc_per_node=8 train_sft.py --stage sft --model runs/pretrain/final --data vhm_instruct.json \
        --image-root images --out runs/sft --global-batch 16 --micro-batch 2 --grad-ckpt
    python train_sft.py ...        # one process: a process group of one, the same code path

The loss is the mean cross-entropy over every label token of the global batch (all micro-batches, all ranks),
computed at label positions only, in checkpointed chunks (model.forward(targets=...)). What the two trainers
share (process group, sharding, checkpoints, logging) is in training.py.
"""
from __future__ import annotations

import argparse
import math
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data as D
import distributed as DI
import model as M
import training as TR

# Stage defaults (a flag given on the command line wins): --stage changes defaults only, never the loop.
STAGES = {
    "pretrain": dict(balance=False, system_prompt=None),
    "sft": dict(balance=True, system_prompt=None),
    "cot": dict(balance=True, system_prompt=D.REASONING_SYSTEM_PROMPT),  # the prompt GRPO trains with
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


# -- the order of an epoch: task balancing, shuffles that every rank and restart agree on, ranks' shares --


def balance_factors(tasks, max_factor: float = 5.0) -> dict:
    """Replication per task and epoch: each task grows toward the largest one's count, at most max_factor times."""
    counts = {t: tasks.count(t) for t in sorted(set(tasks))}
    top = max(counts.values())
    return {t: min(float(max_factor), top / c) for t, c in counts.items()}


def balanced_counts(tasks, factors) -> dict:
    """Samples per task in one balanced epoch (what epoch_order yields)."""
    return {t: int(f) * tasks.count(t) + round((f - int(f)) * tasks.count(t)) for t, f in factors.items()}


def epoch_order(n_or_tasks, epoch: int, seed: int, factors: dict | None = None) -> list[int]:
    """Sample indices of one epoch, shuffled by (seed, epoch) only: every rank and every restart agree.

    With factors (balance_factors), a task's samples appear int(f) times plus a random fraction f - int(f) of them."""
    rng = np.random.default_rng([seed, epoch])
    if factors is None:
        n = n_or_tasks if isinstance(n_or_tasks, int) else len(n_or_tasks)
        return rng.permutation(n).tolist()
    tasks = np.asarray(n_or_tasks)
    picks = []
    for t, f in sorted(factors.items()):
        idx = np.flatnonzero(tasks == t)
        picks += [idx] * int(f)
        picks.append(rng.choice(idx, round((f - int(f)) * len(idx)), replace=False))
    return rng.permutation(np.concatenate(picks)).tolist()


def rank_steps(order, global_batch: int, micro_batch: int, rank: int = 0, world: int = 1, lengths=None):
    """Optimizer steps of an epoch for one rank: steps[s] = this rank's micro-batches (lists of sample indices).

    Global batch s is order[s*G:(s+1)*G] whatever the world size (a partial last one is dropped); rank r takes
    the r-th of `world` equal slices. Sorting a slice by length before cutting micro-batches cuts padding and
    does not change the loss (every sample of the global batch counts the same)."""
    per_rank, rem = divmod(global_batch, world)
    if rem or per_rank % micro_batch:
        raise ValueError(f"global batch {global_batch} must split into {world} ranks x micro-batches of {micro_batch}")
    steps = []
    for s in range(len(order) // global_batch):
        share = list(order[s * global_batch + rank * per_rank: s * global_batch + (rank + 1) * per_rank])
        if lengths is not None:
            share.sort(key=lambda i: -lengths[i])
        steps.append([share[k:k + micro_batch] for k in range(0, per_rank, micro_batch)])
    return steps


# -- one step --


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


def accumulate_gradients(model, micro, d: DI.Dist, chunk: int) -> tuple[float, float]:
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


def load_data(args, proc, log):
    """(dataset, per-task replication factors or None, optimizer steps per epoch), with what the scan found."""
    ds = D.ConversationDataset(args.data, proc, args.image_root, args.max_len, args.system_prompt, args.skip_bad)
    log(f"data: {len(ds)} samples; {ds.stats}" + (f"; first skipped: {ds.bad_examples[0]}" if ds.bad_examples else ""))
    if ds.stats["repeated"] and args.balance:
        log(f"warning: {ds.stats['repeated']} records repeat an earlier one (an oversampled file, such as TinyRS's "
            f"*_oversampled.json?); balancing replicates them again: pass --no-balance")
    factors = balance_factors(ds.tasks, args.balance_max) if args.balance else None
    before = {t: ds.tasks.count(t) for t in sorted(set(ds.tasks))}
    after = balanced_counts(ds.tasks, factors) if factors else before
    log(f"tasks per epoch: {before}" + (f" -> balanced (cap {args.balance_max}x): {after}" if factors else ""))
    steps_per_epoch = sum(after.values()) // args.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{sum(after.values())} samples per epoch make no global batch of {args.global_batch}")
    return ds, factors, steps_per_epoch


def global_batches(ds, factors, args, d: DI.Dist, collate_fn, start: int, total: int, steps_per_epoch: int):
    """(epoch, this rank's micro-batches) for each step from `start` on; each epoch's order depends only on the
    seed and the epoch, so a resumed run sees the batches the uninterrupted one would have."""
    step = start
    while step < total:
        epoch, first = divmod(step, steps_per_epoch)
        order = epoch_order(ds.tasks, epoch, args.seed, factors)
        plan = rank_steps(order, args.global_batch, args.micro_batch, d.rank, d.world, ds.lengths)
        plan = plan[first:min(len(plan), first + total - step)]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=[mb for s in plan for mb in s], collate_fn=collate_fn,
                                             num_workers=args.workers, pin_memory=d.device.type == "cuda")
        batches = iter(loader)
        for _ in plan:
            yield epoch, [next(batches) for _ in range(len(plan[0]))]
            step += 1


def train(args, d: DI.Dist):
    log = print if d.main else (lambda *a, **k: None)
    proc, resume = TR.start_run(args, d)
    ds, factors, steps_per_epoch = load_data(args, proc, log)
    total = args.max_steps or args.epochs * steps_per_epoch
    warmup = math.ceil(args.warmup_ratio * total)
    model, optimizer, trainable = TR.build_model(args, d, resume, dict(vision=args.freeze_vision,
                                                                       merger=args.freeze_merger, llm=args.freeze_llm))
    start = TR.resume_optimizer(resume, model, optimizer, d, {"total_steps": total, "global_batch": args.global_batch})
    progress = TR.Progress(args.out, d, total, start, bool(resume))
    files = TR.processor_files(proc)  # checkpoints keep the pixel limits used
    pack_len = (args.pack_len or args.max_len) if args.pack else None
    if pack_len is not None and pack_len < args.max_len:
        raise SystemExit(f"--pack-len {pack_len} is shorter than --max-len {args.max_len}: a sample would not fit")
    collate_fn = partial(make_batch, pad_id=proc.pad_id, pack_len=pack_len, config=model.config)
    n_llm = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual."))
    n_vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    peak = None
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    last_ckpt = resume
    for step, (epoch, micro) in enumerate(global_batches(ds, factors, args, d, collate_fn, start, total,
                                                         steps_per_epoch), start):
        t0 = time.perf_counter()
        skipped = [why for b in micro for why in b["skipped"]]
        for why in skipped:  # printed by the rank that met it
            print(f"skipped (--skip-bad), image unreadable: {why}", flush=True)
        loss_sum, n_labels = accumulate_gradients(model, micro, d, args.ce_chunk)
        grad_norm = TR.clip_grad_norm(trainable, args.max_grad_norm)
        flops = sum(step_flops(b, n_llm, n_vision, model.config) for b in micro) if peak else 0.0
        t = DI.reduce_dict(d, {"loss": loss_sum, "tokens": sum(int((b["attention_mask"] > 0).sum()) for b in micro),
                               "flops": flops, "slots": sum(b["input_ids"].numel() for b in micro),
                               "skipped": len(skipped)})
        TR.apply_update(optimizer, step, total, warmup, grad_norm, last_ckpt, t["loss"] / n_labels)
        dt = time.perf_counter() - t0
        rec = {"step": step + 1, "epoch": epoch, "loss": t["loss"] / n_labels, "lr": optimizer.param_groups[0]["lr"],
               "grad_norm": grad_norm, "label_tokens": int(n_labels), "tokens": int(t["tokens"]),
               "tokens_per_s": t["tokens"] / dt, "pad_frac": 1 - t["tokens"] / t["slots"], "step_s": dt,
               "skipped": int(t["skipped"])}
        if peak:
            rec["mfu"] = t["flops"] / dt / (peak * 1e12 * d.world)
        progress.log(rec)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            last_ckpt = TR.save_training_checkpoint(
                args.out, step + 1, model, optimizer,
                {"total_steps": total, "warmup_steps": warmup, "global_batch": args.global_batch,
                 "epoch": (step + 1) // steps_per_epoch, "batch_in_epoch": (step + 1) % steps_per_epoch,
                 "seed": args.seed, "args": vars(args)}, d, args.keep, files)
        if args.stop_after and step + 1 - start >= args.stop_after and step + 1 < total:
            log(f"stopping after {args.stop_after} steps at step {step + 1} (--stop-after); --resume continues")
            progress.close()
            return None
    progress.close()
    return TR.save_final(model, args.out, d, args.save_dtype, args.model, files)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    TR.common_args(ap, lr=1e-5, vision_lr=2e-6, weight_decay=0.1, warmup_ratio=0.03)
    a = ap.add_argument
    a("--data", required=True, action="append", help="conversation file (JSON list or JSONL); repeatable")
    a("--stage", choices=sorted(STAGES), default="sft", help="picks defaults: system prompt, task balancing")
    a("--global-batch", type=int, default=16, help="samples per optimizer step, over all ranks")
    a("--micro-batch", type=int, default=1, help="samples per forward on one rank")
    a("--merger-lr", type=float, default=None, help="default: --lr")
    a("--max-len", type=int, default=4096, help="tokens per sample (and per packed row)")
    a("--pack", action="store_true", help="pack each micro-batch's samples into as few rows as fit --pack-len")
    a("--pack-len", type=int, default=None, help="tokens per packed row (default --max-len); shorter rows cost "
                                                  "less attention, as a packed row attends densely under its mask")
    a("--freeze-merger", action="store_true")
    a("--freeze-llm", action="store_true")
    a("--balance", action=argparse.BooleanOptionalAction, default=None, help="default: on for sft and cot")
    a("--balance-max", type=float, default=5.0, help="most times a task is replicated per epoch")
    a("--system-prompt", default=None, help="default: the checkpoint's; cot: the reasoning prompt")
    a("--skip-bad", action="store_true", help="skip and count bad records (at the scan) and images that fail to "
                                               "decode during training (logged, 'skipped' in metrics) instead of "
                                               "stopping")
    a("--stop-after", type=int, default=None, help="stop after N steps of this run, as an interruption would")
    a("--workers", type=int, default=2, help="data-loader processes per rank")
    a("--peak-tflops", type=float, default=None, help="GPU peak bf16 TFLOP/s for MFU (known GPUs are detected)")
    args = ap.parse_args(argv)
    for k, v in STAGES[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    return TR.launch(train, parse_args(argv))


if __name__ == "__main__":
    main()
