"""Stage R: GRPO, written out. Rollout G completions per prompt, score them, normalise rewards within each
prompt's group, and take clipped policy-gradient steps with a KL penalty to a frozen reference.

    torchrun --nproc_per_node=8 train_grpo.py --model runs/cot/final --data vhm_rl.jsonl --image-root imgs \
        --out runs/grpo --prompts-per-step 16 --num-generations 4 --beta 0.001
"""
from __future__ import annotations

import torch

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <reasoning> </reasoning> and <answer> </answer> tags, "
    "respectively, i.e., <reasoning> reasoning process here </reasoning><answer> answer here </answer>"
)


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
