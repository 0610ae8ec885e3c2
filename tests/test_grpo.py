"""GRPO objective and training loop."""
import math

import pytest
import torch

import train_grpo as G


def reference_loss(logp, old, ref, adv, mask, beta, eps, token_mean):
    """The objective written element by element, as plainly as possible."""
    R, L = len(logp), len(logp[0])
    seq_means, tok_sum, tok_n = [], 0.0, 0
    for i in range(R):
        terms = []
        for t in range(L):
            if mask[i][t] == 0:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i]
            clipped = min(max(rho, 1 - eps), 1 + eps)
            term = -min(rho * a, clipped * a)
            if beta:
                d = ref[i][t] - logp[i][t]
                term += beta * (math.exp(d) - d - 1)
            terms.append(term)
        seq_means.append(sum(terms) / max(len(terms), 1))
        tok_sum += sum(terms)
        tok_n += len(terms)
    return tok_sum / tok_n if token_mean else sum(seq_means) / R


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("token_mean", [False, True])
@pytest.mark.parametrize("spread", [0.05, 0.6])  # ratios near 1 (no clipping) and far from it (clipping)
def test_loss_equals_elementwise_computation(beta, token_mean, spread):
    g = torch.Generator().manual_seed(int(spread * 100) + int(beta * 1000) + token_mean)
    R, L = 6, 9
    logp = -torch.rand(R, L, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(R, L, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(R, L, generator=g, dtype=torch.float64)
    adv = torch.randn(R, generator=g, dtype=torch.float64)
    lengths = [9, 1, 4, 7, 2, 9]  # ragged completions
    mask = torch.tensor([[1.0] * n + [0.0] * (L - n) for n in lengths], dtype=torch.float64)
    loss, stats = G.grpo_loss(logp, old, ref, adv, mask, beta, 0.2, token_mean)
    want = reference_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), beta, 0.2,
                          token_mean)
    assert abs(loss.item() - want) < 1e-12
    if spread > 0.5:
        assert stats["clip_frac"] > 0.1
    else:
        assert stats["clip_frac"] == 0.0


def test_first_iteration_gradient_is_advantage_weighted_log_likelihood():
    """mu = 1, beta = 0: rho = 1, and the gradient is that of -mean_i A_i mean_t log pi."""
    torch.manual_seed(0)
    R, L, V = 5, 7, 11
    logits = torch.randn(R, L, V, requires_grad=True)
    tokens = torch.randint(0, V, (R, L))
    mask = torch.ones(R, L)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    adv = torch.randn(R)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    loss, _ = G.grpo_loss(logp, logp.detach(), None, adv, mask, 0.0, 0.2)
    (g1,) = torch.autograd.grad(loss, logits)
    logp2 = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    plain = -(adv * (logp2 * mask).sum(-1) / mask.sum(-1)).mean()
    (g2,) = torch.autograd.grad(plain, logits)
    assert torch.allclose(g1, g2, atol=1e-7) and g1.abs().sum() > 0


def test_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = -torch.rand(3, 4)
    mask = torch.ones(3, 4)
    _, s = G.grpo_loss(logp, logp, logp.clone(), torch.zeros(3), mask, 0.1, 0.2)
    assert s["kl"] == 0.0
    _, s = G.grpo_loss(logp, logp, logp + 0.3, torch.zeros(3), mask, 0.1, 0.2)
    assert s["kl"] > 0


def test_equal_rewards_give_no_policy_gradient():
    adv = G.group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0]), 4)
    assert torch.equal(adv[:4], torch.zeros(4)) and adv[4:].abs().sum() > 0
    logits = torch.randn(8, 3, 5, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[..., 0]
    loss, _ = G.grpo_loss(logp, logp.detach(), None, adv, torch.ones(8, 3), 0.0, 0.2)
    (g,) = torch.autograd.grad(loss, logits)
    assert g[:4].abs().max() == 0 and g[4:].abs().max() > 0


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 10.0, 20.0, 20.0])
    a = G.group_advantages(r, 4)
    for grp in (a[:4], a[4:]):
        assert abs(float(grp.mean())) < 1e-6
        assert abs(float(grp.std()) - 1.0) < 1e-3
    raw = G.group_advantages(r, 4, scale_std=False)
    assert torch.allclose(raw, torch.tensor([-1.5, -0.5, 0.5, 1.5, -5, -5, 5, 5]))


def test_completion_mask_ends_at_the_first_eos():
    toks = torch.tensor([[5, 6, 9, 7, 9], [5, 5, 5, 5, 5], [9, 0, 0, 0, 0]])
    mask, trunc = G.completion_mask(toks, [9])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert trunc.tolist() == [False, True, False]


# -- the training loop -------------------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import data as D  # noqa: E402
import model as M  # noqa: E402
import rewards as RW  # noqa: E402
import train_sft as S  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXELS = ["--min-pixels", str(56 * 56), "--max-pixels", str(28 * 28 * 64)]


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    """A tiny model that has overfitted 8 reasoning answers, and GRPO prompts for the same 8 images: its
    completions earn some reward and some not, so the advantages are not all zero."""
    root = tmp_path_factory.mktemp("grpo")
    syn, tiny = str(root / "syn"), str(root / "tiny")
    D.main(["synth", "--out", syn, "--seed", "5", "--n-pretrain", "4", "--n-sft", "4", "--questions-per-image", "2",
            "--n-grpo", "4", "--n-eval", "4"])
    D.main(["tiny", "--out", tiny])
    cot = json.load(open(os.path.join(syn, "cot.json")))[:8]
    with open(root / "cot8.json", "w") as f:
        json.dump(cot, f)
    S.main(["--model", tiny, "--stage", "cot", "--data", str(root / "cot8.json"), "--image-root", syn,
            "--out", str(root / "cot"), "--max-steps", "40", "--global-batch", "8", "--micro-batch", "8",
            "--lr", "3e-3", "--weight-decay", "0", "--no-balance", "--workers", "0", "--max-len", "512", *PIXELS])
    with open(root / "rl.jsonl", "w") as f:
        for r in cot:
            q = r["conversations"][0]["value"].replace("<image>\n", "")
            a = RW.extract_answer(r["conversations"][1]["value"])
            f.write(json.dumps({"image": r["image"], "question": q, "answer": a,
                                "answer_type": "box" if RW.parse_boxes(a) else "closed"}) + "\n")
    return {"model": str(root / "cot" / "final"), "data": str(root / "rl.jsonl"), "images": syn}


def grpo_args(weak, out, *extra):
    return ["--model", weak["model"], "--data", weak["data"], "--image-root", weak["images"], "--out", str(out),
            "--max-steps", "3", "--prompts-per-step", "4", "--num-generations", "4", "--max-completion-len", "48",
            "--lr", "1e-3", "--beta", "0.04", "--micro-prompts", "2", "--log-completions", *PIXELS, *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


@pytest.fixture(scope="module")
def one_process(weak, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo1") / "run"
    made = []
    real = M.Qwen2VL.from_pretrained

    def keep(*a, **k):
        m = real(*a, **k)
        made.append(m)
        return m
    M.Qwen2VL.from_pretrained = keep
    try:
        G.main(grpo_args(weak, out))
    finally:
        M.Qwen2VL.from_pretrained = real
    return out, made


def test_rewards_vary_and_the_policy_moves_while_the_reference_stays(weak, one_process):
    out, made = one_process
    steps = read_jsonl(out / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert any(s["reward_std"] > 0 for s in steps)  # some groups carry a learning signal
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] > 0  # policy == reference until the first update
    policy, ref = made[0], made[1]
    start = M.Qwen2VL.from_pretrained(weak["model"]).state_dict()
    ref_sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in ref.state_dict().items()}
    assert all(torch.equal(ref_sd[k], start[k]) for k in start)  # the reference never changes
    final = M.Qwen2VL.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in start)  # the policy did
    comps = read_jsonl(out / "completions.jsonl")
    assert len(comps) == 3 * 4 * 4


def test_two_ranks_equal_one_process(weak, one_process, tmp_path):
    """Same prompts and seed: the same completions, rewards and losses, whichever rank rolls a prompt out."""
    out1, _ = one_process
    out2 = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_grpo.py"), *grpo_args(weak, out2)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    c1, c2 = read_jsonl(out1 / "completions.jsonl"), read_jsonl(out2 / "completions.jsonl")
    key = lambda x: (x["step"], x["id"], x["sample"])  # noqa: E731
    assert [(key(a), a["completion"]) for a in sorted(c1, key=key)] == \
           [(key(b), b["completion"]) for b in sorted(c2, key=key)]
    m1, m2 = read_jsonl(out1 / "metrics.jsonl"), read_jsonl(out2 / "metrics.jsonl")
    for a, b in zip(m1, m2):
        for k in ("reward", "reward_format", "reward_accuracy", "completion_len", "loss"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
        # KL compares policy and reference directly, so it shows the last-bit differences that two ranks'
        # gradient sums (added in another order) leave in the weights after Adam steps: 1e-4
        assert abs(a["kl"] - b["kl"]) <= 1e-4 * max(1.0, abs(a["kl"]))


def test_bad_records_name_the_file_and_record(tmp_path):
    p = tmp_path / "rl.jsonl"
    p.write_text('{"image": "a.png", "question": "q?", "answer": "yes"}\n{"image": "b.png", "answer": "no"}\n')
    with pytest.raises(D.DataError, match=r"rl.jsonl: record 1 \(line 2\).*question"):
        G.load_rl_records([str(p)])
    p.write_text('{"image": "a.png", "question": "{VG} where?", "answer": "[[1, 2, 3, 4]]"}\n')
    assert G.load_rl_records([str(p)])[0]["answer_type"] == "box"


def test_vhm_rl_conversion(tmp_path):
    src = tmp_path / "vhm_rl.json"
    src.write_text(json.dumps([
        {"id": 7, "image": "x.png", "conversations": [{"from": "human", "value": "<image>\n{VG} Find the ship."},
                                                       {"from": "gpt", "value": "[[10, 20, 30, 40]]"}]},
        {"id": 8, "image": "y.png", "answer_type": "0",
         "conversations": [{"from": "human", "value": "Is there a plane?\n<image>"}, {"from": "gpt", "value": "Yes"}]},
    ]))
    assert G.convert_vhm_rl(str(src), str(tmp_path / "rl.jsonl")) == 2
    recs = G.load_rl_records([str(tmp_path / "rl.jsonl")])
    assert [(r["question"], r["answer"], r["answer_type"]) for r in recs] == [
        ("{VG} Find the ship.", "[[10, 20, 30, 40]]", "box"), ("Is there a plane?", "Yes", "closed")]


def test_step_prompts_cover_each_epoch_once():
    seen = [i for s in range(5) for i in G.step_prompts(10, s, 4, seed=1)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert G.step_prompts(10, 3, 4, seed=1) == G.step_prompts(10, 3, 4, seed=1)
