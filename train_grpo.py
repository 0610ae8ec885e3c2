"""Stage R: GRPO, written out. Rollout G completions per prompt, score them, normalise rewards within each
prompt's group, and take clipped policy-gradient steps with a KL penalty to a frozen reference.

    torchrun --nproc_per_node=8 train_grpo.py --model runs/cot/final --data vhm_rl.jsonl --image-root imgs \
        --out runs/grpo --prompts-per-step 16 --num-generations 4 --beta 0.001
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
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

import data as D
import model as M
import rewards as R
import train_sft as S


# ----------------------------------------------------------------------------------------------------------------
# The objective


def group_advantages(rewards: torch.Tensor, group: int, scale_std: bool = True, eps: float = 1e-4):
    """A_i = (r_i - mean of its group) / (std of its group + eps); rows b*G .. b*G+G-1 form a group.

    A group whose rewards are all equal gets A = 0: it says nothing about which completion was better."""
    r = rewards.view(-1, group).float()
    a = r - r.mean(-1, keepdim=True)
    if scale_std:
        a = a / (r.std(-1, keepdim=True, unbiased=group > 1).nan_to_num(0.0) + eps)
    return a.flatten()


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


def infer_answer_type(question: str, answer: str) -> str:
    """For records without one: a box answer or a {VG} question is "box", a short answer "closed", else "open"."""
    if R.parse_boxes(answer) or question.lstrip().startswith("{VG}"):
        return "box"
    return "closed" if len(answer.split()) <= 4 else "open"


def _answer_kind(value, where) -> str:
    try:
        return R.answer_kind(value)
    except ValueError as e:
        raise D.DataError(f"{where}: {e}") from None


def load_rl_records(paths, image_root=None) -> list[dict]:
    """JSONL (or a JSON list) of {"image", "question", "answer", "answer_type"?, "system"?}; image paths relative
    to image_root (default: the file's folder). An unknown answer_type stops here, before any model is loaded.
    Errors name the file and record."""
    out = []
    for path in paths:
        root = image_root or os.path.dirname(os.path.abspath(path))
        for rec, where in D.read_records(path):
            missing = [k for k in ("image", "question", "answer") if not isinstance(rec.get(k), str)]
            if missing:
                raise D.DataError(f"{where}: needs string fields image, question, answer; missing or not text: "
                                  f"{missing}")
            kind = rec.get("answer_type")
            kind = _answer_kind(kind, where) if kind is not None else infer_answer_type(rec["question"], rec["answer"])
            system = rec.get("system")
            if system is not None and not isinstance(system, str):
                raise D.DataError(f"{where}: 'system' must be text, got {type(system).__name__}")
            out.append({"id": rec.get("id", f"{os.path.basename(path)}:{len(out)}"),
                        "image": os.path.join(root, rec["image"]), "question": rec["question"],
                        "answer": rec["answer"], "answer_type": kind, "system": system, "where": where})
    if not out:
        raise D.DataError(f"no records in {paths}")
    return out


# -- convert: VHM-RL in LLaVA conversations or in the public GRPO layout (prompt, image, solution) -> our JSONL --

HUB_DATA_HINT = 'reading a datasets folder or parquet needs the `datasets` package: pip install -e ".[hub-data]"'


def _hub_module(name):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(HUB_DATA_HINT) from None


def _source_rows(src):
    """(row, where) of every record of SRC: a datasets save_to_disk folder (split "train"), parquet (a file or a
    folder of them), or a JSON list / JSONL file. Images come as stored (bytes), never decoded."""
    parquet = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".parquet")) \
        if os.path.isdir(src) else [src] if src.endswith(".parquet") else []
    if os.path.isdir(src) and not parquet:
        datasets = _hub_module("datasets")
        try:
            ds = datasets.load_from_disk(src)
        except FileNotFoundError as e:
            raise D.DataError(f"{src}: a folder, but neither a datasets save_to_disk folder nor parquet files: "
                              f"{e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise D.DataError(f"{src}: no 'train' split (splits: {list(ds)})")
            ds, src = ds["train"], f"{src} (split train)"
        if isinstance(ds.features.get("image"), datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))  # the stored bytes, not a PIL image
        for i, row in enumerate(ds):
            yield row, f"{src}: row {i}"
    elif parquet:
        pq = _hub_module("pyarrow.parquet")
        for path in parquet:
            i = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    yield row, f"{path}: row {i}"
                    i += 1
    else:
        yield from D.read_records(src)


def _text_of(message) -> str:
    c = message.get("content") if isinstance(message, dict) else None
    if isinstance(c, str):
        return c.replace(D.IMAGE_PLACEHOLDER, "").strip()
    parts = [p.get("text") for p in c or [] if isinstance(p, dict) and p.get("type", "text") == "text"]
    return " ".join(t.strip() for t in parts if isinstance(t, str) and t.strip())


def _image_source(image, src_dir, where):
    """Bytes for an embedded image, a path for a file: image as a path relative to SRC's folder, a data URL or
    base64 string, raw bytes, or a {"bytes", "path"} struct."""
    import base64
    import binascii
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if not isinstance(image, str) or not image:
        raise D.DataError(f"{where}: no image; expected a path, a data URL, base64 data or {{bytes, path}}")
    if os.path.isfile(os.path.join(src_dir, image)):
        return os.path.join(src_dir, image)
    try:
        return base64.b64decode(image.split(",", 1)[-1] if image.startswith("data:") else image, validate=True)
    except (binascii.Error, ValueError):
        raise D.DataError(f"{where}: image {image[:80]!r} is neither a file under {src_dir} nor base64 data") from None


def _image_ext(data: bytes, where) -> str:
    """File extension of the format PIL reads in `data`; unreadable bytes stop the conversion."""
    import io
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except Exception as e:
        raise D.DataError(f"{where}: embedded image is not readable: {e}") from None
    return {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())


def _public_record(row, where, src_dir, dst_dir) -> dict:
    """One public-layout row -> {id, question, answer, answer_type, system, image: bytes or a path from DST}."""
    sol = row.get("solution")
    if not isinstance(sol, (list, tuple)) or len(sol) < 2:
        raise D.DataError(f"{where}: 'solution' must be a list [answer_type, answer, question, image], got "
                          f"{str(sol)[:80]!r}")
    kind = _answer_kind(sol[0], where)
    msgs = row.get("prompt")
    msgs = [{"role": "user", "content": msgs}] if isinstance(msgs, str) else list(msgs or [])
    users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    question = (_text_of(users[-1]) if users else "") or str(sol[2] if len(sol) > 2 and sol[2] else "").strip()
    if not question:
        raise D.DataError(f"{where}: no question: no user text in 'prompt' and no solution[2]")
    system = next((_text_of(m) for m in msgs if isinstance(m, dict) and m.get("role") == "system"), None)
    image = row.get("image")
    if not image or isinstance(image, dict) and not (image.get("bytes") or image.get("path")):
        image = sol[3] if len(sol) > 3 else None  # the public reward's own base64 copy of the image
    image = _image_source(image, src_dir, where)
    return {"id": row.get("id"), "question": question, "answer": str(sol[1]).strip(), "answer_type": kind,
            "system": system, "image": image if isinstance(image, bytes) else os.path.relpath(image, dst_dir)}


def _llava_record(rec, where) -> dict:
    """One LLaVA conversation (one image, a question and an answer); the image path is kept as written."""
    msgs, images = D.conversation_messages(rec, where)
    user = [m for m in msgs if m["role"] == "user"]
    bot = [m for m in msgs if m["role"] == "assistant"]
    if not user or not bot or len(images) != 1:
        raise D.DataError(f"{where}: expected one image, a question and an answer")
    q = _text_of(user[0])
    a = _text_of(bot[0])
    kind = rec.get("answer_type", rec.get("type"))
    kind = _answer_kind(kind, where) if kind is not None else infer_answer_type(q, a)
    return {"id": rec.get("id"), "question": q, "answer": a, "answer_type": kind, "system": None, "image": images[0]}


def convert_vhm_rl(src: str, dst: str) -> dict:
    """VHM-RL (LLaVA conversations, or the public prompt/image/solution layout in any container) -> our GRPO JSONL.

    Embedded images are written, bytes unchanged, to <DST stem>_images/<index>.<ext> next to DST, and image paths
    are written relative to DST's folder (LLaVA paths stay as written, for --image-root). Writing is atomic.
    Returns {"records", "answer_types": {kind: count}, "system", "images", "unreadable_boxes"}."""
    import shutil
    from tqdm import tqdm
    src_dir = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    dst_dir = os.path.dirname(os.path.abspath(dst))
    img_name = os.path.splitext(os.path.basename(dst))[0] + "_images"
    img_dir = os.path.join(dst_dir, img_name)
    tmp, tmp_dir = f"{dst}.tmp{os.getpid()}", f"{img_dir}.tmp{os.getpid()}"
    summary = {"records": 0, "answer_types": {}, "system": 0, "images": 0, "unreadable_boxes": 0}
    os.makedirs(dst_dir, exist_ok=True)
    try:
        with open(tmp, "w") as f:
            for n, (row, where) in enumerate(tqdm(_source_rows(src), desc="convert", unit=" records")):
                r = _public_record(row, where, src_dir, dst_dir) if "solution" in row else _llava_record(row, where)
                if isinstance(r["image"], bytes):
                    name = f"{n}.{_image_ext(r['image'], where)}"
                    os.makedirs(tmp_dir, exist_ok=True)
                    with open(os.path.join(tmp_dir, name), "wb") as g:
                        g.write(r["image"])
                    r["image"] = os.path.join(img_name, name)
                    summary["images"] += 1
                # a box answer our parser cannot read would earn 0 whatever the model says
                summary["unreadable_boxes"] += r["answer_type"] == "box" and not R.parse_boxes(r["answer"])
                out = {"id": r["id"] if r["id"] is not None else n, "image": r["image"], "question": r["question"],
                       "answer": r["answer"], "answer_type": r["answer_type"]}
                if r["system"]:
                    out["system"] = r["system"]
                    summary["system"] += 1
                f.write(json.dumps(out) + "\n")
                summary["records"] += 1
                summary["answer_types"][r["answer_type"]] = summary["answer_types"].get(r["answer_type"], 0) + 1
        if os.path.isdir(tmp_dir):  # images first: the JSONL never points at files that are not there
            shutil.rmtree(img_dir, ignore_errors=True)
            os.replace(tmp_dir, img_dir)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return summary


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
    with gathered(model):
        tokens = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                pv.to(device) if pv is not None else None, batch["image_grid_thw"],
                                max_new_tokens=max_len, temperature=temperature, num_samples=group,
                                eos_token_ids=eos, generator=gens)
    model.train()
    return tokens


def completion_logprobs(model, batch, tokens, cmask, group, chunk, device):
    """log pi(token) of each completion token under `model`: one forward over prompt + completion rows, the
    prompt's image encoded once per group, log-probs only at completion positions (chunked)."""
    ids = torch.cat([batch["input_ids"].to(device).repeat_interleave(group, 0), tokens], 1)
    amask = torch.cat([batch["attention_mask"].to(device).repeat_interleave(group, 0), cmask.long()], 1)
    P = batch["input_ids"].shape[1]
    targets = torch.full_like(ids, -100)
    targets[:, P - 1:-1] = tokens.masked_fill(cmask == 0, -100)
    thw = batch["image_grid_thw"]
    pv = batch["pixel_values"]
    lp = model(ids, amask, pv.to(device) if pv is not None else None,
               thw.repeat_interleave(group, 0) if thw is not None else None, targets=targets, chunk_size=chunk,
               image_groups=group)
    return lp[:, P - 1:-1]


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


def train(args, d: S.Dist):
    log = print if d.main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    S.check_out_shared(args.out, d)
    args.model = S.resolve_model(args.model, d)
    proc = D.Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    records = load_rl_records(args.data, args.image_root)
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    judge = None
    n_open = sum(r["answer_type"] == "open" for r in records)
    if n_open and args.judge_model:
        judge = R.Judge(model=args.judge_model, base_url=args.judge_base_url)
    elif n_open:
        log(f"warning: {n_open} open-ended records and no --judge-model: they are graded by exact match to the "
            f"reference (the public recipe asks an LLM judge, or drops them when it has no key)")
    total = args.max_steps or args.epochs * math.ceil(len(records) / args.prompts_per_step)
    if args.prompts_per_step % d.world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {d.world} ranks")
    warmup = math.ceil(args.warmup_ratio * total)
    resume = S.resume_point(args.resume, args.out, d)

    def prepare(m):
        S.freeze(m, args.freeze_vision, False, False)
        m.set_grad_checkpointing(args.grad_ckpt)
    model = S.load_sharded(resume or args.model, d, args.bf16, prepare)
    ref = None
    if args.beta != 0:  # frozen reference: the starting model, sharded like the policy, never updated
        ref = S.load_sharded(args.model, d, args.bf16, lambda m: m.requires_grad_(False))
        ref.eval()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(S.param_groups(model, args.lr, None, args.vision_lr, args.weight_decay))
    start = 0
    if resume:
        state = S.load_training_checkpoint(resume, model, optimizer, d)
        start = state["step"]
        log(f"resumed from {resume} at step {start}")
    os.makedirs(args.out, exist_ok=True)
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, disable=not d.main, dynamic_ncols=True)
    metrics = S.MetricsLogger(os.path.join(args.out, "metrics.jsonl"), d.main, start if resume else None, bar.write)
    if d.main and not resume and os.path.exists(os.path.join(args.out, "completions.jsonl")):
        os.remove(os.path.join(args.out, "completions.jsonl"))
    eos = model.default_eos()
    G, per_rank = args.num_generations, args.prompts_per_step // d.world
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

        n_tok_local = float(cmask.sum())
        sizes = torch.tensor([len(recs) * G, n_tok_local], dtype=torch.float64, device=d.device)
        dist.all_reduce(sizes)
        n_total = float(sizes[1]) if args.token_mean else float(sizes[0])
        micro = [(sub_batch(batch, b0, args.micro_prompts), slice(b0 * G, (b0 + args.micro_prompts) * G))
                 for b0 in range(0, len(recs), args.micro_prompts)]
        ref_lp, old_lp = [], []
        with torch.no_grad():
            for mb, sl in micro:
                if ref is not None:
                    ref_lp.append(completion_logprobs(ref, mb, tokens[sl], cmask[sl], G, args.ce_chunk, d.device))
                if args.iterations > 1:  # the ratio's denominator: the very forward of the update, before it
                    old_lp.append(completion_logprobs(model, mb, tokens[sl], cmask[sl], G, args.ce_chunk,
                                                      d.device))
        stats_acc = {"kl": 0.0, "clip_frac": 0.0, "loss": 0.0}
        grad_norm = 0.0
        for it in range(args.iterations):
            for j, (mb, sl) in enumerate(micro):
                lp = completion_logprobs(model, mb, tokens[sl], cmask[sl], G, args.ce_chunk, d.device)
                old = lp.detach() if args.iterations == 1 else old_lp[j]  # mu = 1: rho = 1 exactly
                loss, st = grpo_loss(lp, old, ref_lp[j] if ref_lp else None, adv[sl], cmask[sl], args.beta,
                                     args.epsilon, args.token_mean, n_total / d.world)
                loss.backward()  # FSDP averages over ranks; n_total / world makes that the global mean
                w = float(cmask[sl].sum()) / args.iterations  # token-weighted sums, divided once all ranks add up
                stats_acc["kl"] += st["kl"] * w
                stats_acc["clip_frac"] += st["clip_frac"] * w
                stats_acc["loss"] += float(loss.detach()) / args.iterations
            grad_norm = S.clip_grad_norm(trainable, args.max_grad_norm)
            if not math.isfinite(grad_norm):
                raise FloatingPointError(f"step {step + 1}: non-finite gradient norm; stopped before the update. "
                                         f"Last good checkpoint: {last_ckpt or 'none'}")
            S.set_lr(optimizer, S.lr_factor(step, total, warmup))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if args.log_completions:  # every rollout, gathered on rank 0, for reading what the policy does
            rows = [{"step": step + 1, "id": r["id"], "sample": g, "completion": completions[b * G + g],
                     "reward": float(total_r[b * G + g]), "advantage": float(adv[b * G + g])}
                    for b, r in enumerate(recs) for g in range(G)]
            gathered_rows = [None] * d.world
            dist.all_gather_object(gathered_rows, rows)
            if d.main:
                with open(os.path.join(args.out, "completions.jsonl"), "a") as f:
                    f.writelines(json.dumps(x) + "\n" for part in gathered_rows for x in part)
        rec = step_metrics(step + 1, recs, G, total_r, per, names, cmask, truncated, stats_acc, d, tokens)
        rec.update({"lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                    "judge_failures": judge.failures if judge else 0, "rollout_s": t1 - t0, "scoring_s": t2 - t1,
                    "update_s": t3 - t2, "rollout_tokens_per_s": rec.pop("_gen_tokens") / max(t1 - t0, 1e-9),
                    "peak_mem_gb": S.peak_memory_gb(d.device)})
        metrics.log(rec)
        bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            last_ckpt = S.save_training_checkpoint(args.out, step + 1, model, optimizer,
                                                   {"total_steps": total, "seed": args.seed, "args": vars(args)},
                                                   d, args.keep)
    bar.close()
    return S.save_final(model, args.out, d, args.save_dtype, args.model)


def sub_batch(batch, start, n):
    """Prompts start..start+n of an encoded batch (rows, their images' patches and grids)."""
    thw = batch["image_grid_thw"]
    out = {"input_ids": batch["input_ids"][start:start + n], "attention_mask": batch["attention_mask"][start:start + n],
           "pixel_values": None, "image_grid_thw": None}
    if thw is not None:  # one image per prompt
        patches = thw.prod(-1)
        lo, hi = int(patches[:start].sum()), int(patches[:start + n].sum())
        out["pixel_values"], out["image_grid_thw"] = batch["pixel_values"][lo:hi], thw[start:start + n]
    return out


def step_metrics(step, recs, G, total_r, per, names, cmask, truncated, st, d, tokens):
    """Per-step numbers summed over ranks: reward mean/std, per function, accuracy by answer type, lengths."""
    lengths = cmask.sum(-1)
    types = ["box", "closed", "open"]
    acc = per.get("accuracy", [0.0] * len(total_r))
    kinds = [r["answer_type"] for r in recs for _ in range(G)]
    vals = [len(total_r), float(total_r.sum()), float((total_r ** 2).sum()), float(lengths.sum()),
            float(truncated.sum()), float(tokens.numel()), st["kl"], st["clip_frac"], st["loss"]]
    vals += [float(sum(per[n])) for n in names]
    for k in types:
        vals += [float(sum(a for a, kk in zip(acc, kinds) if kk == k)), float(sum(kk == k for kk in kinds))]
    t = torch.tensor(vals, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    mx = torch.tensor(float(lengths.max()) if len(lengths) else 0.0, dtype=torch.float64, device=d.device)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    n = float(t[0])
    mean = float(t[1]) / n
    rec = {"step": step, "reward": mean, "reward_std": math.sqrt(max(float(t[2]) / n - mean ** 2, 0.0)),
           "completion_len": float(t[3]) / n, "completion_len_max": float(mx), "truncated": float(t[4]) / n,
           "kl": float(t[6]) / max(float(t[3]), 1.0), "clip_frac": float(t[7]) / max(float(t[3]), 1.0),
           "loss": float(t[8]) / d.world,
           "_gen_tokens": float(t[3])}
    for i, name in enumerate(names):
        rec[f"reward_{name}"] = float(t[9 + i]) / n
    base = 9 + len(names)
    for i, k in enumerate(types):
        if float(t[base + 2 * i + 1]) > 0:
            rec[f"accuracy_{k}"] = float(t[base + 2 * i]) / float(t[base + 2 * i + 1])
    return rec


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--model", required=True, help="policy to start from (and the frozen reference): folder or hub id")
    a("--data", required=True, action="append", help="JSONL of {image, question, answer, answer_type}; repeatable")
    a("--image-root", default=None, help="folder image paths are relative to (default: the data file's folder)")
    a("--out", required=True, help="output folder: metrics.jsonl, checkpoint-STEP/, final/")
    a("--max-steps", type=int, default=None, help="steps (default: --epochs worth of prompts)")
    a("--epochs", type=int, default=1)
    a("--prompts-per-step", type=int, default=16, help="prompts per step over all ranks (paper: batch 16)")
    a("--num-generations", type=int, default=4, help="G completions per prompt (paper: 4)")
    a("--micro-prompts", type=int, default=1, help="prompts (x G completions) per forward in the update")
    a("--max-completion-len", type=int, default=1024, help="new tokens per completion (paper: up to 8192)")
    a("--temperature", type=float, default=1.0)
    a("--lr", type=float, default=1e-6)
    a("--vision-lr", type=float, default=None, help="default: --lr")
    a("--weight-decay", type=float, default=0.0)
    a("--warmup-ratio", type=float, default=0.0)
    a("--max-grad-norm", type=float, default=1.0)
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
    a("--system-prompt", default=D.REASONING_SYSTEM_PROMPT)
    a("--min-pixels", type=int, default=512 * 28 * 28)
    a("--max-pixels", type=int, default=1280 * 28 * 28)
    a("--freeze-vision", action="store_true")
    a("--grad-ckpt", action="store_true")
    a("--ce-chunk", type=int, default=1024, help="completion tokens per chunk of the log-prob computation")
    a("--seed", type=int, default=0)
    a("--log-completions", action="store_true", help="append every rollout to OUT/completions.jsonl")
    a("--save-every", type=int, default=0)
    a("--keep", type=int, default=None)
    a("--resume", nargs="?", const="latest", default=None)
    a("--device", default=None)
    S.add_precision_args(ap)
    return ap.parse_args(argv)


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        p = argparse.ArgumentParser(prog="train_grpo.py convert", description=convert_vhm_rl.__doc__.split("\n")[0])
        p.add_argument("src", help="LLaVA or public-layout JSON/JSONL, a datasets save_to_disk folder, or parquet")
        p.add_argument("dst", help="GRPO JSONL to write (embedded images go to <DST stem>_images/)")
        a = p.parse_args(argv[1:])
        s = convert_vhm_rl(a.src, a.dst)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["answer_types"].items()))
        print(f"wrote {s['records']} records to {a.dst} ({kinds}); {s['images']} embedded images written")
        print(f"{s['system']} of {s['records']} prompts carry their own system message (kept per record); the other "
              f"{s['records'] - s['system']} get --system-prompt")
        if s["unreadable_boxes"]:
            print(f"warning: {s['unreadable_boxes']} box answers hold no box in [x1, y1, x2, y2] or (x1,y1),(x2,y2) "
                  "form; they can only score 0")
        return s
    return S.launch(train, parse_args(argv))


if __name__ == "__main__":
    main()
