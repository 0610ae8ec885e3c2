"""Stage R: GRPO, written out. Rollout G completions per prompt, score them, normalise rewards within each
prompt's group, and take clipped policy-gradient steps with a KL penalty to a frozen reference.

    torchrun --nproc_per_node=8 train_grpo.py --model runs/cot/final --data vhm_rl.jsonl --image-root imgs \
        --out runs/grpo --prompts-per-step 16 --num-generations 4 --beta 0.001
    python train_grpo.py convert SRC DST    # the public VHM-RL files -> our JSONL (rl_data.py)

The data (records, answer types, conversion) is in rl_data.py, the rewards in rewards.py, and what both trainers
share (process group, sharding, checkpoints, logging) in training.py and distributed.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from contextlib import contextmanager

import torch
from torch.distributed.fsdp import FSDPModule

import data as D
import distributed as DI
import rewards as R
import rl_data as RD
import training as TR


# ----------------------------------------------------------------------------------------------------------------
# The objective


def group_advantages(rewards: torch.Tensor, group: int, scale_std: bool = True, eps: float = 1e-4):
    """A_i = (r_i - mean of its group) / (std of its group + eps); rows b*G .. b*G+G-1 form a group.

    A group whose rewards are all equal gets A = 0 exactly: it says nothing about which completion was better.
    (Computed, r - mean would not always be 0: the mean of G equal floats can be one rounding off, and dividing by
    std + eps ~ 1e-4 would blow that up to ~1e-3.)"""
    r = rewards.view(-1, group).float()
    a = r - r.mean(-1, keepdim=True)
    if scale_std:
        a = a / (r.std(-1, keepdim=True, unbiased=group > 1).nan_to_num(0.0) + eps)
    return a.masked_fill((r == r[:, :1]).all(-1, keepdim=True), 0.0).flatten()


def completion_mask(tokens: torch.Tensor, eos_ids, pad_id=None):
    """1 on completion tokens up to and including the first EOS, 0 after; and whether each row ran out of room."""
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), dtype=tokens.dtype, device=tokens.device))
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    mask = (~after).float()
    truncated = ~is_eos.any(-1)
    return mask, truncated


def grpo_loss(logp, old_logp, ref_logp, adv, mask, beta: float, epsilon: float, token_mean: bool = False,
              n_total: float | None = None):
    """Clipped GRPO objective per completion token, then averaged.

    logp: [R, L] log pi_theta of the sampled tokens (with grad); old_logp: [R, L] at rollout time;
    ref_logp: [R, L] under the frozen reference or None (beta = 0); adv: [R]; mask: [R, L] (1 up to the EOS).
    per token: -min(rho * A, clip(rho, 1-eps, 1+eps) * A) + beta * k3,  rho = exp(logp - old_logp),
    k3 = exp(ref - logp) - (ref - logp) - 1  (non-negative, 0 when the policy equals the reference).
    Reduction: mean over each completion's tokens, then over completions (the paper's), or with token_mean the
    mean over all tokens. n_total: the divisor (completions or tokens) across all ranks, when the batch is split;
    default this batch's own."""
    rho = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = -torch.min(rho * a, rho.clamp(1 - epsilon, 1 + epsilon) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta != 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if token_mean:
        loss = (per_token * mask).sum() / (n_total if n_total is not None else mask.sum().clamp(min=1))
    else:
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_seq.sum() / (n_total if n_total is not None else per_seq.numel())
    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        clipped = ((rho < 1 - epsilon) & (a < 0)) | ((rho > 1 + epsilon) & (a > 0))
        stats = {"kl": float((kl * mask).sum() / n_tok), "clip_frac": float((clipped.float() * mask).sum() / n_tok)}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Data


def step_prompts(n_records: int, step: int, per_step: int, seed: int) -> list[int]:
    """Global record indices of one step: consecutive slices of a per-epoch shuffle (seeded by epoch)."""
    out = []
    pos = step * per_step
    while len(out) < per_step:
        epoch, i = divmod(pos, n_records)
        order = list(range(n_records))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(per_step - len(out), n_records - i)
        out += order[i:i + take]
        pos += take
    return out


def sample_seed(seed: int, step: int, record: int) -> int:
    """Sampling seed of one prompt at one step: independent of the rank that happens to roll it out."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{record}".encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------------------------
# Rollout


@contextmanager
def gathered(model):
    """Unshard every FSDP unit once for a whole rollout and reshard after: generation then runs on plain tensors
    instead of all-gathering each layer for every generated token."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    model._get_fsdp_state()._lazy_init()  # the root must initialise before its layers are called one by one
    for u in units:
        u.unshard()
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(u is not model, recurse=False)  # FSDP keeps the root gathered for backward


def encode_prompts(proc, records, system_prompt):
    """A record's own system message (from the public data) wins over `system_prompt` (--system-prompt)."""
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": r["question"]}]}],
                                      add_generation_prompt=True,
                                      system_prompt=system_prompt if r.get("system") is None else r["system"])
             for r in records]
    images = []
    for r in records:
        try:
            images.append(D.load_image(r["image"]))
        except (OSError, ValueError) as e:
            raise D.DataError(f"{r['where']}: {e}") from None
    return proc(text=texts, images=images, padding_side="left")


def rollout(model, batch, group, max_len, temperature, seeds, eos, device):
    """G completions per prompt from one batched generate (each prompt and image encoded once), on the gathered
    weights in their compute dtype (bf16 under the bf16 policy): the same tokens the plain model would give."""
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    pv = batch["pixel_values"]
    model.eval()
    with gathered(model), torch.compiler.set_stance("force_eager"):  # --compile compiles the update, not decoding
        tokens = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                pv.to(device) if pv is not None else None, batch["image_grid_thw"],
                                max_new_tokens=max_len, temperature=temperature, num_samples=group,
                                eos_token_ids=eos, generator=gens)
    model.train()
    return tokens


def completion_logprobs(model, batch, tokens, cmask, temperature, chunk, device):
    """log pi_T(token) = log softmax(logits / T)[token] of each completion token under `model`, 0 after its EOS.
    Each prompt (image included) runs through the decoder once and its G completions attend to it
    (model.SharedPrompts): half the tokens of rows [prompt | completion] in the demo's update."""
    pv = batch["pixel_values"]
    return model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                 pv.to(device) if pv is not None else None, batch["image_grid_thw"], completions=tokens,
                 targets=tokens.masked_fill(cmask == 0, -100), chunk_size=chunk, temperature=temperature)


def logprob_temperature(args) -> float:
    """The T of the update's log pi_T: --logprob-temperature, by default the sampling temperature (greedy: 1).

    pi_T is the distribution the rollout sampled from, so log pi_T gives the on-policy gradient; at T = 1, the
    public recipe's setting, the two choices agree. Scoring samples drawn at T < 1 under pi_1 instead gives
    another, off-policy gradient: each token's push is measured against pi_1's probabilities, not those it was
    drawn with (the advantages still decide its sign, and tied groups still add nothing)."""
    if args.logprob_temperature is not None:
        return args.logprob_temperature
    return args.temperature if args.temperature > 0 else 1.0


# ----------------------------------------------------------------------------------------------------------------
# The loop


def score(records, completions, group, names, judge, mode, spatial):
    """Summed rewards per completion, each function's rewards, and (optionally) spatial-consistency weights."""
    recs = [r for r in records for _ in range(group)]
    per = R.compute_rewards(completions, [r["answer"] for r in recs], [r["answer_type"] for r in recs],
                            [r["question"] for r in recs], names=names, judge=judge, mode=mode,
                            images=[r["image"] for r in recs])  # the judge sees what the policy saw
    total = torch.tensor([sum(per[n][i] for n in names) for i in range(len(recs))], dtype=torch.float32)
    weight = torch.ones(len(recs))
    if spatial:
        for b, r in enumerate(records):
            if r["answer_type"] == "box":
                weight[b * group:(b + 1) * group] = R.spatial_consistency(completions[b * group:(b + 1) * group])
    return total, per, weight


def sub_batch(batch, rows: list[int]):
    """The prompts `rows` of an encoded batch (their ids, masks, images' patches and grids)."""
    thw = batch["image_grid_thw"]
    out = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows],
           "pixel_values": None, "image_grid_thw": None}
    if thw is not None:  # one image per prompt
        ends = thw.prod(-1).cumsum(0).tolist()
        out["pixel_values"] = torch.cat([batch["pixel_values"][(ends[r - 1] if r else 0):ends[r]] for r in rows])
        out["image_grid_thw"] = thw[rows]
    return out


def update_groups(d, adv, group: int, micro: int, skip_ties: bool) -> list[list[int]]:
    """The prompts each update forward takes, `micro` at a time.

    skip_ties: a group whose advantages are all 0 (equal rewards) adds exactly nothing to the loss or gradient
    when there is no KL term, so its forward is skipped. FSDP needs the same number of forwards on every rank: a
    rank with fewer useful micro-batches than another runs one tied group in each it lacks, and every rank runs
    at least one forward, so that the optimizer always sees (zero) gradients rather than none."""
    n = len(adv) // group
    if not skip_ties:
        return [list(range(b, min(b + micro, n))) for b in range(0, n, micro)]
    useful = adv.view(n, group).ne(0).any(-1).tolist()
    keep = [b for b in range(n) if useful[b]]
    out = [keep[i:i + micro] for i in range(0, len(keep), micro)]
    n_micro = max(1, int(DI.reduce_dict(d, {"m": len(out)}, "max")["m"]))
    return out + [[b] for b in range(n) if not useful[b]][:n_micro - len(out)]


def update(args, d, model, ref, optimizer, trainable, batch, tokens, cmask, adv, schedule) -> dict:
    """--iterations optimizer steps on one rollout, in micro-batches of --micro-prompts prompts. Reference and old
    log-probs come first, without gradients, from the same forward as the update's. schedule: (step, total steps,
    warmup steps, last checkpoint). Returns token-weighted sums of the objective's statistics over this rank."""
    step, total, warmup, last_ckpt = schedule
    G = args.num_generations
    micro = [(sub_batch(batch, rows), [b * G + g for b in rows for g in range(G)])
             for rows in update_groups(d, adv, G, args.micro_prompts, ref is None)]

    def logprobs(m, mb, sl):
        return completion_logprobs(m, mb, tokens[sl], cmask[sl], logprob_temperature(args), args.ce_chunk,
                                   d.device)
    with torch.no_grad():
        ref_lp = [logprobs(ref, mb, sl) for mb, sl in micro] if ref is not None else None
        old_lp = [logprobs(model, mb, sl) for mb, sl in micro] if args.iterations > 1 else None
    sizes = DI.reduce_dict(d, {"completions": len(tokens), "tokens": cmask.sum()})
    n_total = sizes["tokens" if args.token_mean else "completions"]
    sums = {"kl": 0.0, "clip_frac": 0.0, "loss": 0.0, "grad_norm": 0.0}
    for _ in range(args.iterations):
        for j, (mb, sl) in enumerate(micro):
            lp = logprobs(model, mb, sl)
            old = lp.detach() if old_lp is None else old_lp[j]  # mu = 1: rho = 1 exactly
            loss, st = grpo_loss(lp, old, ref_lp[j] if ref_lp else None, adv[sl], cmask[sl], args.beta,
                                 args.epsilon, args.token_mean, n_total / d.world)
            loss.backward()  # FSDP averages over ranks; n_total / world makes that the global mean
            w = float(cmask[sl].sum()) / args.iterations  # token-weighted sums, divided once all ranks add up
            sums["kl"] += st["kl"] * w
            sums["clip_frac"] += st["clip_frac"] * w
            sums["loss"] += float(loss.detach()) / args.iterations
        sums["grad_norm"] = TR.clip_grad_norm(trainable, args.max_grad_norm)
        TR.apply_update(optimizer, step, total, warmup, sums["grad_norm"], last_ckpt)
    return sums


def step_metrics(recs, G, total_r, per, names, cmask, truncated, st, d) -> dict:
    """One step's numbers over all ranks: reward mean/std, per function, accuracy by answer type, lengths."""
    lengths = cmask.sum(-1)
    kinds = [r["answer_type"] for r in recs for _ in range(G)]
    acc = per.get("accuracy", [0.0] * len(total_r))
    sums = {"n": len(total_r), "reward": total_r.sum(), "reward_sq": (total_r ** 2).sum(), "tokens": lengths.sum(),
            "truncated": truncated.sum(), "kl": st["kl"], "clip_frac": st["clip_frac"], "loss": st["loss"],
            **{f"reward_{n}": sum(per[n]) for n in names}}
    for k in ("box", "closed", "open"):
        sums[f"accuracy_{k}"] = sum(a for a, kk in zip(acc, kinds) if kk == k)
        sums[f"n_{k}"] = sum(kk == k for kk in kinds)
    t = DI.reduce_dict(d, sums)
    longest = DI.reduce_dict(d, {"len": lengths.max() if len(lengths) else 0.0}, "max")["len"]
    n, mean = t["n"], t["reward"] / t["n"]
    rec = {"reward": mean, "reward_std": math.sqrt(max(t["reward_sq"] / n - mean ** 2, 0.0)),
           "completion_len": t["tokens"] / n, "completion_len_max": longest, "truncated": t["truncated"] / n,
           "kl": t["kl"] / max(t["tokens"], 1.0), "clip_frac": t["clip_frac"] / max(t["tokens"], 1.0),
           "loss": t["loss"] / d.world, "generated_tokens": t["tokens"],
           **{f"reward_{n_}": t[f"reward_{n_}"] / n for n_ in names}}
    rec.update({f"accuracy_{k}": t[f"accuracy_{k}"] / t[f"n_{k}"] for k in ("box", "closed", "open") if t[f"n_{k}"]})
    return rec


def log_completions(path, d, step, recs, G, completions, total_r, adv):
    """Every rollout of the step, gathered on rank 0 and appended to OUT/completions.jsonl, for reading what the
    policy does."""
    rows = [{"step": step, "id": r["id"], "sample": g, "completion": completions[b * G + g],
             "reward": float(total_r[b * G + g]), "advantage": float(adv[b * G + g])}
            for b, r in enumerate(recs) for g in range(G)]
    parts = DI.gather_objects(d, rows)
    if d.main:
        with open(path, "a") as f:
            f.writelines(json.dumps(x) + "\n" for part in parts for x in part)


def make_judge(records, args, log):
    n_open = sum(r["answer_type"] == "open" for r in records)
    if n_open and args.judge_model:
        return R.Judge(model=args.judge_model, base_url=args.judge_base_url)
    if n_open:
        log(f"warning: {n_open} open-ended records and no --judge-model: they are graded by exact match to the "
            f"reference (the public recipe asks an LLM judge, or drops them when it has no key)")
    return None


def train(args, d: DI.Dist):
    log = print if d.main else (lambda *a, **k: None)
    proc, resume = TR.start_run(args, d)
    records = RD.load_rl_records(args.data, args.image_root)
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    judge = make_judge(records, args, log)
    if args.prompts_per_step % d.world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {d.world} ranks")
    total = args.max_steps or args.epochs * math.ceil(len(records) / args.prompts_per_step)
    warmup = math.ceil(args.warmup_ratio * total)
    model, optimizer, trainable = TR.build_model(args, d, resume, dict(vision=args.freeze_vision))
    ref = None
    if args.beta != 0:  # frozen reference: the starting model, sharded like the policy, never updated
        ref = DI.load_sharded(args.model, d, args.bf16, lambda m: m.requires_grad_(False)).eval()
    schedule = {"total_steps": total, "prompts_per_step": args.prompts_per_step}
    start = TR.resume_optimizer(resume, model, optimizer, d, schedule)
    progress = TR.Progress(args.out, d, total, start, bool(resume))
    completions_path = os.path.join(args.out, "completions.jsonl")
    if d.main and not resume and os.path.exists(completions_path):
        os.remove(completions_path)
    files = TR.processor_files(proc)  # checkpoints keep the pixel limits used
    eos, G, per_rank = model.default_eos(), args.num_generations, args.prompts_per_step // d.world
    last_ckpt = resume
    for step in range(start, total):
        t0 = time.perf_counter()
        idx = step_prompts(len(records), step, args.prompts_per_step, args.seed)
        mine = idx[d.rank * per_rank:(d.rank + 1) * per_rank]  # a prompt's G completions stay on this rank
        recs = [records[i] for i in mine]
        batch = encode_prompts(proc, recs, args.system_prompt)
        tokens = rollout(model, batch, G, args.max_completion_len, args.temperature,
                         [sample_seed(args.seed, step, i) for i in mine], eos, d.device)
        cmask, truncated = completion_mask(tokens, eos)
        t1 = time.perf_counter()
        completions = proc.batch_decode(tokens)
        total_r, per, weight = score(recs, completions, G, names, judge, args.reward_mode, args.spatial_consistency)
        adv = (group_advantages(total_r, G, not args.no_std_scale) * weight).to(d.device)
        t2 = time.perf_counter()
        st = update(args, d, model, ref, optimizer, trainable, batch, tokens, cmask, adv, (step, total, warmup,
                                                                                              last_ckpt))
        t3 = time.perf_counter()
        if args.log_completions:
            log_completions(completions_path, d, step + 1, recs, G, completions, total_r, adv)
        rec = {"step": step + 1, **step_metrics(recs, G, total_r, per, names, cmask, truncated, st, d),
               "lr": optimizer.param_groups[0]["lr"], "grad_norm": st["grad_norm"],
               "judge_failures": judge.failures if judge else 0, "rollout_s": t1 - t0, "scoring_s": t2 - t1,
               "update_s": t3 - t2}
        rec["rollout_tokens_per_s"] = rec.pop("generated_tokens") / max(t1 - t0, 1e-9)
        progress.log(rec)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            last_ckpt = TR.save_training_checkpoint(args.out, step + 1, model, optimizer,
                                                    {**schedule, "seed": args.seed, "args": vars(args)}, d, args.keep,
                                                    files)
    progress.close()
    return TR.save_final(model, args.out, d, args.save_dtype, args.model, files)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    TR.common_args(ap, lr=1e-6)
    a = ap.add_argument
    a("--data", required=True, action="append", help="JSONL of {image, question, answer, answer_type}; repeatable")
    a("--prompts-per-step", type=int, default=16, help="prompts per step over all ranks (paper: batch 16)")
    a("--num-generations", type=int, default=4, help="G completions per prompt (paper: 4)")
    a("--micro-prompts", type=int, default=1, help="prompts (x G completions) per forward in the update")
    a("--max-completion-len", type=int, default=1024, help="new tokens per completion (paper: up to 8192)")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts (0: greedy)")
    a("--logprob-temperature", type=float, default=None,
      help="T of the update's log-probabilities log softmax(logits / T); default --temperature (the on-policy "
           "gradient; greedy rollouts: 1)")
    a("--beta", type=float, default=0.001, help="KL weight (paper: 0.001); 0 skips the reference model")
    a("--epsilon", type=float, default=0.2, help="clip range of the ratio")
    a("--iterations", type=int, default=1, help="updates per rollout batch (mu); 1: the paper's on-policy form")
    a("--token-mean", action="store_true", help="average the loss over all tokens instead of per completion")
    a("--no-std-scale", action="store_true", help="advantages r - mean(group), without dividing by the std")
    a("--rewards", default="format,accuracy", help="summed reward functions: format, accuracy, positional")
    a("--reward-mode", default="continuous", choices=R.MODES, help="paper Table III variants")
    a("--spatial-consistency", action="store_true",
      help="scale a box group's advantages by the mean pairwise IoU of its G boxes (RSGround-R1)")
    a("--judge-model", default=None, help="LLM judge for open answers (e.g. gpt-4.1-mini); key: OPENAI_API_KEY")
    a("--judge-base-url", default=None, help="any OpenAI-compatible endpoint")
    a("--system-prompt", default=D.REASONING_SYSTEM_PROMPT, help="for records without their own")
    a("--log-completions", action="store_true", help="append every rollout to OUT/completions.jsonl")
    args = ap.parse_args(argv)
    if args.max_completion_len < 1:
        ap.error(f"--max-completion-len must be >= 1, got {args.max_completion_len}")
    if args.logprob_temperature is not None and args.logprob_temperature <= 0:
        ap.error(f"--logprob-temperature must be > 0, got {args.logprob_temperature}")
    return args


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        return RD.main(argv[1:], prog="train_grpo.py convert")
    return TR.launch(train, parse_args(argv))


if __name__ == "__main__":
    main()
