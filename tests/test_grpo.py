"""GRPO objective and training loop."""
import math
import re

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


@pytest.mark.parametrize("group", [2, 3, 5, 6, 8])
def test_tied_rewards_give_exactly_zero_advantages(group):
    """The mean of G equal floats can be one rounding off; divided by std + eps that would become ~1e-3."""
    r = torch.tensor([1.7] * group + [2.9] * group + [0.1] * (group - 1) + [1.0])
    a = G.group_advantages(r, group).view(3, group)
    assert (a[:2] == 0).all() and (a[2] != 0).all()
    assert a[2, -1] > 0 and abs(float(a[2].sum())) < 1e-4


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
import checkpoint as CK  # noqa: E402
import rewards as RW  # noqa: E402
import distributed as DI  # noqa: E402
import rl_data as RD  # noqa: E402
import synth  # noqa: E402
import train_sft as S  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXELS = ["--min-pixels", str(56 * 56), "--max-pixels", str(28 * 28 * 64)]


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    """A tiny model that has overfitted 8 reasoning answers, and GRPO prompts for the same 8 images: its
    completions earn some reward and some not, so the advantages are not all zero."""
    root = tmp_path_factory.mktemp("grpo")
    syn, tiny = str(root / "syn"), str(root / "tiny")
    synth.main(["synth", "--out", syn, "--seed", "5", "--n-pretrain", "4", "--n-sft", "4", "--questions-per-image",
                "2", "--n-grpo", "4", "--n-eval", "4"])
    synth.main(["tiny", "--out", tiny])
    cot = json.load(open(os.path.join(syn, "cot.json")))[:8]
    with open(root / "cot8.json", "w") as f:
        json.dump(cot, f)
    S.main(["--model", tiny, "--stage", "cot", "--data", str(root / "cot8.json"), "--image-root", syn,
            "--out", str(root / "cot"), "--max-steps", "60", "--global-batch", "8", "--micro-batch", "8",
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
    real = CK.load

    def keep(*a, **k):
        m = real(*a, **k)
        made.append(m)
        return m
    CK.load = keep
    try:
        G.main(grpo_args(weak, out))
    finally:
        CK.load = real
    return out, made


def test_rewards_vary_and_the_policy_moves_while_the_reference_stays(weak, one_process):
    out, made = one_process
    steps = read_jsonl(out / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert any(s["reward_std"] > 0 for s in steps)  # some groups carry a learning signal
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] > 0  # policy == reference until the first update
    policy, ref = made[0], made[1]
    start = CK.load(weak["model"]).state_dict()
    ref_sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in ref.state_dict().items()}
    assert all(torch.equal(ref_sd[k], start[k]) for k in start)  # the reference never changes
    final = CK.load(out / "final").state_dict()
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


def weak_batch(weak, n=4):
    proc = D.Processor.from_pretrained(weak["model"], 56 * 56, 28 * 28 * 64)
    recs = RD.load_rl_records([weak["data"]], weak["images"])
    return proc, recs, G.encode_prompts(proc, recs[:n], D.REASONING_SYSTEM_PROMPT)


def test_bf16_fsdp_rollout_equals_the_plain_bf16_model(weak):
    """Under the bf16 policy the rollout must see its prompt: FSDP once rebuilt each layer's inputs (the KV cache
    with them), so decoding attended to nothing of the prompt or image."""
    proc, recs, batch = weak_batch(weak)
    plain = CK.load(weak["model"], dtype=torch.bfloat16)
    want = G.rollout(plain, batch, 2, 24, 0.0, [0] * 4, plain.default_eos(), torch.device("cpu"))
    assert len({tuple(r) for r in want.tolist()}) > 2  # the answers depend on the prompt: the test has teeth
    d = DI.setup_distributed("cpu")
    try:
        sharded = DI.load_sharded(weak["model"], d, bf16=True)
        assert sharded.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # fp32 master weights
        got = G.rollout(sharded, batch, 2, 24, 0.0, [0] * 4, plain.default_eos(), d.device)
    finally:
        DI.teardown_distributed()
    assert got.tolist() == want.tolist()


def test_bf16_training_logs_the_plain_bf16_completions(weak, tmp_path):
    """train_grpo.py --bf16 --temperature 0: the logged completions are what generate gives on the plain bf16
    model for the same prompts."""
    out = tmp_path / "bf16"
    G.main(grpo_args(weak, out, "--bf16", "--temperature", "0", "--max-steps", "1", "--beta", "0"))
    logged = read_jsonl(out / "completions.jsonl")
    proc, recs, _ = weak_batch(weak)
    mine = [recs[i] for i in G.step_prompts(len(recs), 0, 4, seed=0)]
    plain = CK.load(weak["model"], dtype=torch.bfloat16)
    tokens = G.rollout(plain, G.encode_prompts(proc, mine, D.REASONING_SYSTEM_PROMPT), 4, 48, 0.0, [0] * 4,
                       plain.default_eos(), torch.device("cpu"))
    want = {(r["id"], g): text for b, r in enumerate(mine) for g, text in
            enumerate(proc.batch_decode(tokens[b * 4:(b + 1) * 4]))}
    assert {(c["id"], c["sample"]): c["completion"] for c in logged} == want


def test_several_iterations_start_from_a_ratio_of_exactly_one(weak, tmp_path, monkeypatch):
    """--iterations 2 at temperature 0.7: the ratio's denominator is the update's own forward, run before the first
    update, so rho = 1 on every token of iteration 1 (generate's tempered, decode-path log-probs were not); with
    lr 0 it stays 1 in iteration 2 as well (clip fraction 0), with lr > 0 it moves (the old policy is kept)."""
    seen = []
    real = G.grpo_loss

    def spy(logp, old_logp, ref_logp, adv, mask, *a, **k):
        seen.append(float(((logp.detach() - old_logp).abs() * mask).max()))
        return real(logp, old_logp, ref_logp, adv, mask, *a, **k)
    monkeypatch.setattr(G, "grpo_loss", spy)
    for lr in ("0", "1e-3"):
        seen.clear()
        out = tmp_path / f"mu2-{lr}"
        G.main(grpo_args(weak, out, "--iterations", "2", "--lr", lr, "--temperature", "0.7", "--max-steps", "2"))
        assert len(seen) == 2 * 2 * 2  # steps x iterations x micro-batches
        first, second = seen[0:2] + seen[4:6], seen[2:4] + seen[6:8]
        assert first == [0.0] * 4
        if lr == "0":
            assert second == [0.0] * 4
            steps = read_jsonl(out / "metrics.jsonl")
            assert [s["clip_frac"] for s in steps] == [0.0, 0.0] and any(s["reward_std"] > 0 for s in steps)
        else:
            assert max(second) > 1e-4


def test_tied_groups_are_skipped_without_changing_the_gradient(weak, tmp_path, monkeypatch):
    """At beta 0 a group whose rewards tie adds nothing: the update skips its forward, and the gradient it hands
    the optimizer equals the one of the update that runs every group (temperature 0.7, one prompt a forward)."""
    proc, recs, batch = weak_batch(weak)
    model = CK.load(weak["model"])
    args = G.parse_args(["--model", weak["model"], "--data", weak["data"], "--out", str(tmp_path), "--beta", "0",
                         "--micro-prompts", "1", "--temperature", "0.7"])
    tokens = G.rollout(model, batch, 4, 24, 0.7, [1, 2, 3, 4], model.default_eos(), torch.device("cpu"))
    cmask, _ = G.completion_mask(tokens, model.default_eos())
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0, 0, 0, 0, 0.3, 0.2, -0.4, -0.1, 0, 0, 0, 0])
    grads, calls = [], []
    monkeypatch.setattr(G.TR, "apply_update",
                        lambda *a, **k: grads.append([p.grad.clone() for p in model.parameters()]))
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    every = G.update_groups
    d = DI.setup_distributed("cpu")
    try:
        G.update(args, d, model, None, None, list(model.parameters()), batch, tokens, cmask, adv, (0, 1, 0, None))
        model.zero_grad(set_to_none=True)
        monkeypatch.setattr(G, "update_groups", lambda d, adv, g, m, skip: every(d, adv, g, m, False))
        G.update(args, d, model, None, None, list(model.parameters()), batch, tokens, cmask, adv, (0, 1, 0, None))
    finally:
        hook.remove()
        DI.teardown_distributed()
    assert len(calls) == 2 + 4
    assert max(float((a - b).abs().max()) for a, b in zip(*grads)) <= 1e-6 * max(float(g.abs().max()) for g in grads[1])
    assert max(float(g.abs().max()) for g in grads[0]) > 0


def test_every_rank_runs_as_many_update_forwards(monkeypatch):
    """FSDP's collectives need the same number of forwards on every rank: a rank with fewer useful groups than
    another runs one tied group per forward it lacks, and a rank runs one forward even when every group ties."""
    adv = torch.tensor([0.5, -0.5, 0, 0, 0.1, -0.1, 0, 0])  # G 2: groups 0 and 2 useful, 1 and 3 tied
    d = DI.Dist(0, 1, 0, torch.device("cpu"))
    monkeypatch.setattr(G.DI, "reduce_dict", lambda d, v, op="sum": {k: x for k, x in v.items()})
    assert G.update_groups(d, adv, 2, 1, True) == [[0], [2]]
    assert G.update_groups(d, adv, 2, 1, False) == [[0], [1], [2], [3]]
    assert G.update_groups(d, torch.zeros(8), 2, 3, True) == [[0]]
    assert G.update_groups(d, torch.tensor([0.5, -0.5, 0, 0, 0.1, -0.1, 1, -1]), 2, 2, True) == [[0, 2], [3]]
    monkeypatch.setattr(G.DI, "reduce_dict", lambda d, v, op="sum": {"m": 3})  # another rank needs 3
    assert G.update_groups(d, adv, 2, 1, True) == [[0], [2], [1]]


def test_bad_records_name_the_file_and_record(tmp_path):
    p = tmp_path / "rl.jsonl"
    p.write_text('{"image": "a.png", "question": "q?", "answer": "yes"}\n{"image": "b.png", "answer": "no"}\n')
    with pytest.raises(D.DataError, match=r"rl.jsonl: record 1 \(line 2\).*question"):
        RD.load_rl_records([str(p)])
    p.write_text('{"image": "a.png", "question": "{VG} where?", "answer": "[[1, 2, 3, 4]]"}\n')
    assert RD.load_rl_records([str(p)])[0]["answer_type"] == "box"


def test_vhm_rl_conversion(tmp_path):
    src = tmp_path / "vhm_rl.json"
    src.write_text(json.dumps([
        {"id": 7, "image": "x.png", "conversations": [{"from": "human", "value": "<image>\n{VG} Find the ship."},
                                                       {"from": "gpt", "value": "[[10, 20, 30, 40]]"}]},
        {"id": 8, "image": "y.png", "answer_type": "1",
         "conversations": [{"from": "human", "value": "Is there a plane?\n<image>"}, {"from": "gpt", "value": "Yes"}]},
        {"id": 9, "image": "z.png", "answer_type": 0,
         "conversations": [{"from": "human", "value": "<image>Describe it."}, {"from": "gpt", "value": "A port."}]},
    ]))
    assert RD.convert_vhm_rl(str(src), str(tmp_path / "rl.jsonl"))["records"] == 3
    assert [(r["image"], r["answer_type"]) for r in read_jsonl(tmp_path / "rl.jsonl")] == \
           [("x.png", "box"), ("y.png", "closed"), ("z.png", "open")]   # paths as written (for --image-root)
    recs = RD.load_rl_records([str(tmp_path / "rl.jsonl")])
    assert [(r["question"], r["answer"], r["answer_type"]) for r in recs] == [
        ("{VG} Find the ship.", "[[10, 20, 30, 40]]", "box"), ("Is there a plane?", "Yes", "closed"),
        ("Describe it.", "A port.", "open")]


def test_step_prompts_cover_each_epoch_once():
    seen = [i for s in range(5) for i in G.step_prompts(10, s, 4, seed=1)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert G.step_prompts(10, 3, 4, seed=1) == G.step_prompts(10, 3, 4, seed=1)


# -- the public GRPO layout (hub dataset aybora/VHM_dataset_grpo): prompt, image, solution -----------------------

import base64  # noqa: E402
import io  # noqa: E402

from PIL import Image  # noqa: E402


def _encoded(colour, size, fmt):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _b64(data):
    return base64.b64encode(data).decode()


TEXT = lambda t: {"type": "text", "text": t}  # noqa: E731
IMAGE_PART = {"type": "image", "text": None}  # datasets fills the absent key with None
# (colour, size, format) of each record's image, and what the conversion must make of the record
PUBLIC_IMAGES = [((220, 30, 30), (40, 30), "PNG"), ((30, 30, 220), (64, 48), "JPEG"), ((30, 200, 30), (36, 36), "PNG"),
                 ((240, 240, 240), (20, 50), "JPEG")]
PUBLIC_WANT = [("open", "Describe the field.", "A red field.", "Think, then answer."),
               ("closed", "Look. Is it blue?", "Yes", None),
               ("box", "Where is the ship?", "[[10, 20, 300, 400]]", None),      # no prompt text: solution[2]
               ("closed", "Is it white?", "yes", None)]                          # the last user message


def public_rows(codes=("0", "1", "2", "1")):
    imgs = [_encoded(*x) for x in PUBLIC_IMAGES]
    prompts = [
        [{"role": "system", "content": [TEXT("Think, then answer.")]},
         {"role": "user", "content": [IMAGE_PART, TEXT("Describe the field.")]}],
        [{"role": "user", "content": [TEXT("Look."), IMAGE_PART, TEXT("Is it blue?")]}],
        [{"role": "user", "content": [IMAGE_PART]}],
        [{"role": "user", "content": [TEXT("First question?")]}, {"role": "assistant", "content": [TEXT("Yes.")]},
         {"role": "user", "content": [IMAGE_PART, TEXT("Is it white?")]}],
    ]
    answers = ["A red field.", "Yes", "[[10, 20, 300, 400]]", "yes"]
    asked = ["Describe the field.", "Is it blue?", "Where is the ship?", "Is it white?"]
    return [{"prompt": p, "image": im, "solution": [c, a, q, _b64(im)]}
            for p, im, c, a, q in zip(prompts, imgs, codes, answers, asked)]


def write_public(kind, folder, codes=("0", "1", "2", "1")):
    """The four public rows in one container; returns the path to convert."""
    os.makedirs(folder, exist_ok=True)
    rows = public_rows(codes)
    if kind == "jsonl":  # every JSON image form: base64, a data URL, {bytes, path}, a path next to the file
        with open(os.path.join(folder, "imgs.jpg"), "wb") as f:
            f.write(rows[3]["image"])
        forms = [_b64(rows[0]["image"]), "data:image/jpeg;base64," + _b64(rows[1]["image"]),
                 {"bytes": _b64(rows[2]["image"]), "path": "hub/2.png"}, "imgs.jpg"]
        rows[1]["prompt"] = [{"role": "user", "content": "Look. <image>Is it blue?"}]  # content as a plain string
        path = os.path.join(folder, "src.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({**r, "image": im}) + "\n" for r, im in zip(rows, forms))
        return path
    import datasets
    datasets.disable_progress_bars()
    v = datasets.Value("string")
    features = datasets.Features({"prompt": [{"role": v, "content": [{"type": v, "text": v}]}],
                                  "image": datasets.Image(), "solution": datasets.Sequence(v)})
    images = [{"bytes": r["image"], "path": f"hub/{i}.img"} for i, r in enumerate(rows)]  # bytes win over path
    ds = datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "image": images,
                                     "solution": [r["solution"] for r in rows]}, features=features)
    path = os.path.join(folder, "src")
    if kind == "dataset_dict":
        datasets.DatasetDict({"train": ds}).save_to_disk(path)
    elif kind == "dataset":
        ds.save_to_disk(path)
    elif kind == "parquet":
        path += ".parquet"
        ds.to_parquet(path)
    else:  # a folder of parquet shards
        os.makedirs(path)
        ds.select(range(2)).to_parquet(os.path.join(path, "train-00000-of-00002.parquet"))
        ds.select(range(2, 4)).to_parquet(os.path.join(path, "train-00001-of-00002.parquet"))
    return path


def _close(rgb, want, tol=12):
    return all(abs(a - b) <= tol for a, b in zip(rgb, want))


@pytest.mark.parametrize("kind", ["dataset_dict", "dataset", "parquet", "parquet_dir", "jsonl"])
def test_public_layouts_convert(kind, tmp_path, capsys):
    src = write_public(kind, tmp_path / "src")
    out = tmp_path / "out"
    G.main(["convert", src, str(out / "rl.jsonl")])
    printed = capsys.readouterr().out
    assert "wrote 4 records" in printed and "closed 2" in printed and "open 1" in printed and "box 1" in printed
    assert "1 of 4 prompts carry their own system message" in printed and "--system-prompt" in printed
    assert "warning" not in printed  # every box answer is readable
    recs = RD.load_rl_records([str(out / "rl.jsonl")])  # no --image-root: paths are relative to the file
    assert [(r["answer_type"], r["question"], r["answer"], r["system"]) for r in recs] == PUBLIC_WANT
    embedded = 3 if kind == "jsonl" else 4
    for i, (r, (colour, size, fmt)) in enumerate(zip(recs, PUBLIC_IMAGES)):
        img = D.load_image(r["image"])
        assert img.size == size and _close(img.getpixel((size[0] // 2, size[1] // 2)), colour)
        if i < embedded:  # written next to DST with its own bytes and an extension of its real format
            want = out / "rl_images" / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            assert os.path.samefile(r["image"], want) and want.read_bytes() == _encoded(colour, size, fmt)
        else:  # a path stays where it is, now relative to DST's folder
            assert os.path.samefile(r["image"], tmp_path / "src" / "imgs.jpg")
    assert sorted(os.listdir(out)) == ["rl.jsonl", "rl_images"]  # no temporary files left
    assert len(os.listdir(out / "rl_images")) == embedded


@pytest.mark.parametrize("kind, where", [("jsonl", r"src\.jsonl: record 1 \(line 2\)"),
                                         ("dataset_dict", r"src \(split train\): row 1"),
                                         ("parquet_dir", r"train-00000-of-00002\.parquet: row 1")])
def test_unknown_answer_code_stops_conversion(kind, where, tmp_path):
    src = write_public(kind, tmp_path / "src", codes=("0", "7", "2", "1"))
    with pytest.raises(D.DataError, match=where + r": unknown answer type '7'; expected one of 0, 1, 2, open"):
        RD.convert_vhm_rl(src, str(tmp_path / "out" / "rl.jsonl"))
    assert os.listdir(tmp_path / "out") == []  # nothing half-written: no JSONL, no images, no temporaries


def test_image_from_solution_and_unreadable_boxes(tmp_path, capsys):
    """Without an image column the public reward's own base64 copy (solution[3]) is used; a box answer that
    parse_boxes cannot read is counted and warned about."""
    data = _encoded((9, 99, 199), (30, 20), "PNG")
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"prompt": [{"role": "user", "content": "<image>Where?"}],
                               "solution": ["2", "{<1><2><3><4>}", "Where?", _b64(data)]}) + "\n")
    s = G.main(["convert", str(src), str(tmp_path / "rl.jsonl")])
    assert s["unreadable_boxes"] == 1 and "warning: 1 box answers" in capsys.readouterr().out
    assert (tmp_path / "rl_images" / "0.png").read_bytes() == data


def test_unknown_answer_type_stops_loading(tmp_path):
    p = tmp_path / "rl.jsonl"
    p.write_text('{"image": "a.png", "question": "q?", "answer": "yes", "answer_type": "1"}\n'
                 '{"image": "b.png", "question": "q?", "answer": "no", "answer_type": "7"}\n')
    with pytest.raises(D.DataError, match=r"rl\.jsonl: record 1 \(line 2\): unknown answer type '7'"):
        RD.load_rl_records([str(p)])
    p.write_text('{"image": "a.png", "question": "q?", "answer": "yes", "answer_type": 2}\n')
    assert RD.load_rl_records([str(p)])[0]["answer_type"] == "box"


def test_convert_without_datasets_names_the_extra(tmp_path, monkeypatch):
    src = write_public("dataset_dict", tmp_path / "src")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails, as when it is not installed
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[hub-data]"')):
        RD.convert_vhm_rl(src, str(tmp_path / "rl.jsonl"))


def test_a_records_own_system_prompt_wins(tmp_path):
    Image.new("RGB", (28, 28), (1, 2, 3)).save(tmp_path / "a.png")

    class SpyProcessor:
        systems = []

        def apply_chat_template(self, messages, add_generation_prompt, system_prompt):
            self.systems.append(system_prompt)
            return "prompt"

        def __call__(self, text, images, padding_side):
            return {"texts": text, "images": images}

    recs = [{"question": "q", "image": str(tmp_path / "a.png"), "system": "Own.", "where": "r0"},
            {"question": "q", "image": str(tmp_path / "a.png"), "system": None, "where": "r1"}]
    proc = SpyProcessor()
    G.encode_prompts(proc, recs, "From --system-prompt.")
    assert proc.systems == ["Own.", "From --system-prompt."]


def test_score_sends_each_record_image_to_the_judge():
    class SpyJudge:
        items = []

        def score_many(self, items):
            self.items += items
            return [0.5] * len(items)

    recs = [{"answer": "A port.", "answer_type": "open", "question": "Describe.", "image": "/d/a.png"},
            {"answer": "yes", "answer_type": "closed", "question": "Any?", "image": "/d/b.png"}]
    judge = SpyJudge()
    comps = ["<reasoning>r</reasoning><answer>A harbour.</answer>", "<answer>x</answer>", "<answer>yes</answer>",
             "<answer>no</answer>"]
    total, per, _ = G.score(recs, comps, 2, ["accuracy"], judge, "continuous", False)
    assert [it[3] for it in judge.items] == ["/d/a.png", "/d/a.png"]
    assert per["accuracy"] == [0.5, 0.5, 1.0, 0.0]


@pytest.mark.parametrize("container", ["dataset_dict", "parquet", "jsonl"])
def test_converted_public_data_trains_one_step(weak, tmp_path, monkeypatch, container):
    """The weak fixture's records in the public layout, in each container, converted, then one GRPO step."""
    import datasets
    datasets.disable_progress_bars()
    src = read_jsonl(weak["data"])[:2]
    codes = ["0", {"closed": "1", "box": "2"}[src[1]["answer_type"]]]
    rows = []
    for i, (r, code) in enumerate(zip(src, codes)):
        prompt = [{"role": "user", "content": [IMAGE_PART, TEXT(r["question"])]}]
        if i == 0:
            prompt.insert(0, {"role": "system", "content": [TEXT(D.REASONING_SYSTEM_PROMPT)]})
        with open(os.path.join(weak["images"], r["image"]), "rb") as f:
            img = f.read()
        rows.append({"prompt": prompt, "image": {"bytes": img, "path": None},
                     "solution": [code, r["answer"], r["question"], _b64(img)]})
    v = datasets.Value("string")
    features = datasets.Features({"prompt": [{"role": v, "content": [{"type": v, "text": v}]}],
                                  "image": datasets.Image(), "solution": datasets.Sequence(v)})
    ds = datasets.Dataset.from_list(rows, features=features)
    source = tmp_path / {"dataset_dict": "vhm", "parquet": "vhm.parquet", "jsonl": "vhm.jsonl"}[container]
    if container == "dataset_dict":
        datasets.DatasetDict({"train": ds}).save_to_disk(str(source))
    elif container == "parquet":
        ds.to_parquet(str(source))
    else:
        with open(source, "w") as f:
            f.writelines(json.dumps({**r, "image": _b64(r["image"]["bytes"])}) + "\n" for r in rows)
    dst = tmp_path / "conv" / "rl.jsonl"
    G.main(["convert", str(source), str(dst)])
    seen = []
    real = G.encode_prompts
    monkeypatch.setattr(G, "encode_prompts", lambda proc, recs, sp: seen.extend(r["system"] for r in recs) or
                        real(proc, recs, sp))
    out = tmp_path / "run"
    G.main(["--model", weak["model"], "--data", str(dst), "--out", str(out), "--max-steps", "1",
            "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-len", "16", "--beta", "0",
            "--log-completions", *PIXELS])
    assert [s["step"] for s in read_jsonl(out / "metrics.jsonl")] == [1]
    assert sorted(c["id"] for c in read_jsonl(out / "completions.jsonl")) == [0, 0, 1, 1]
    assert sorted(seen, key=str) == [D.REASONING_SYSTEM_PROMPT, None]
    assert os.path.isfile(out / "final" / "config.json")
