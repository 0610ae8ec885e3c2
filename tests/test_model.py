"""model.py against transformers (the oracle) on tiny random checkpoints in HF layout."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import conftest
import ask
import checkpoint as CK
import model as M


def rel_err(a, b):
    """Largest difference relative to the logit scale."""
    return ((a - b).abs().max() / b.abs().max()).item()


def oracle_images(sizes, seed=0, max_pixels=28 * 28 * 64):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    rng = np.random.default_rng(seed)
    ims = [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]
    o = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)(images=ims, return_tensors="pt")
    return o["pixel_values"], o["image_grid_thw"]


def build_ids(cfg, parts):
    """parts: strings (tokenized) and ints (an image of that many merged tokens, with its vision markers)."""
    tok = conftest.build_tokenizer()
    ids = []
    for p in parts:
        if isinstance(p, int):
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * p + [cfg.vision_end_token_id]
        else:
            ids += tok.encode(p).ids
    return ids


def left_pad(rows, pad):
    L = max(map(len, rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def two_image_prompts(cfg, sizes, opener="user\n"):
    """Two left-padded prompts of different lengths, each with one image: pixel values, grids, ids, mask."""
    pv, thw = oracle_images(sizes)
    n = (thw.prod(-1) // 4).tolist()
    ids, mask = left_pad([build_ids(cfg, [opener, n[0], "What is in this aerial scene?"]),
                          build_ids(cfg, [n[1], "ships"])], cfg.pad_token_id)
    return pv, thw, ids, mask


def prompt_completion_rows(ids, mask, pv, thw, comp, cmask, G):
    """Rows [prompt | completion] for G completions per prompt of two_image_prompts, each row with its prompt's
    image: ids, mask, pixel values, grids."""
    first = int(thw[0].prod())
    return (torch.cat([ids.repeat_interleave(G, 0), comp], 1), torch.cat([mask.repeat_interleave(G, 0), cmask], 1),
            torch.cat([pv[:first]] * G + [pv[first:]] * G), thw.repeat_interleave(G, 0))


def hf_logits(hf, ids, mask=None, pv=None, thw=None):
    mm = (ids == hf.config.image_token_id).int()
    with torch.no_grad():
        if thw is None:
            return hf(input_ids=ids, attention_mask=mask).logits, None
        pos, _ = hf.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=thw, attention_mask=mask)
        out = hf(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm,
                 position_ids=pos)
        return out.logits, pos


@pytest.fixture(scope="module")
def pair(tiny_ckpt):
    path, hf = tiny_ckpt
    return CK.load(path), hf


def masked(x, mask):
    return x if mask is None else x * mask[..., None]


@pytest.mark.parametrize("case", ["text", "one_image", "two_images", "padded_batch"])
def test_logits_and_positions_equal_transformers(pair, case):
    ours, hf = pair
    cfg = ours.config
    mask = pv = thw = None
    if case == "text":
        ids = torch.tensor([build_ids(cfg, ["<|im_start|>user\nDescribe the scene.<|im_end|>\n"])])
    elif case == "one_image":
        pv, thw = oracle_images([(60, 90)])
        ids = torch.tensor([build_ids(cfg, ["<|im_start|>user\n", int(thw[0].prod()) // 4, "Count ships."])])
    elif case == "two_images":
        pv, thw = oracle_images([(60, 90), (150, 56)])
        n = (thw.prod(-1) // 4).tolist()
        ids = torch.tensor([build_ids(cfg, ["user\n", n[0], "and then", n[1], "compare them"])])
    else:
        pv, thw = oracle_images([(84, 84), (56, 140)])
        n = (thw.prod(-1) // 4).tolist()
        ids, mask = left_pad([build_ids(cfg, ["user\n", n[0], "Is there a plane in this aerial scene?"]),
                              build_ids(cfg, [n[1], "ships?"])], cfg.pad_token_id)
    want, want_pos = hf_logits(hf, ids, mask, pv, thw)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
    assert rel_err(masked(got, mask), masked(want, mask)) < 1e-5
    if want_pos is not None:
        pos, _ = M.rope_index(ids, mask, thw, cfg)
        assert torch.equal(pos, want_pos)



def test_the_2bs_rope_theta_equals_transformers_too(tmp_path):
    """The fixtures use the tiny model's theta 10; the released checkpoints use 1e6."""
    hf = conftest.make_checkpoint(str(tmp_path), rope_theta=1e6)
    ours = CK.load(str(tmp_path))
    assert ours.config.rope_theta == 1e6
    pv, thw = oracle_images([(60, 90)])
    ids = torch.tensor([build_ids(ours.config, ["<|im_start|>user\n", int(thw[0].prod()) // 4, "Count ships."])])
    want, _ = hf_logits(hf, ids, None, pv, thw)
    with torch.no_grad():
        got = ours(ids, pixel_values=pv, image_grid_thw=thw)
    assert rel_err(got, want) < 1e-5

def test_positions_skip_left_padding_and_restart_per_packed_segment(pair):
    ours, _ = pair
    cfg = ours.config
    pv, thw = oracle_images([(56, 84)])
    row = build_ids(cfg, ["a", int(thw[0].prod()) // 4, "b c"])
    ids, mask = left_pad([row, row[:2]], cfg.pad_token_id)
    pos, nxt = M.rope_index(ids, mask, thw, cfg)
    alone, nxt_alone = M.rope_index(torch.tensor([row]), None, thw, cfg)
    assert torch.equal(pos[:, 0], alone[:, 0]) and nxt[0] == nxt_alone[0]
    # packed: two samples in one row, the second starts again at 0
    text = build_ids(cfg, ["b c d"])[:3]
    packed = torch.tensor([text + text])
    seg = torch.tensor([[1, 1, 1, 2, 2, 2]])
    p, _ = M.rope_index(packed, seg, None, cfg)
    assert p[0, 0].tolist() == [0, 1, 2, 0, 1, 2]


def test_packed_rows_equal_separate_samples(pair):
    ours, _ = pair
    cfg = ours.config
    a = build_ids(cfg, ["Is there a ship near the harbour?"])
    b = build_ids(cfg, ["Classify the scene: forest"])
    with torch.no_grad():
        la = ours(torch.tensor([a]))
        lb = ours(torch.tensor([b]))
        lp = ours(torch.tensor([a + b]), attention_mask=torch.tensor([[1] * len(a) + [2] * len(b)]))
    assert rel_err(lp[0, :len(a)], la[0]) < 1e-5 and rel_err(lp[0, len(a):], lb[0]) < 1e-5


def dense_mask_attention(q, k, v, segments):
    """The plain reference: an explicit [B, 1, T, T] causal mask within each segment id (0 = padding; a padding
    query sees only itself), through SDPA's math path."""
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    m = same & torch.ones(T, T, dtype=torch.bool).tril() & (segments[:, None, :] > 0) | torch.eye(T, dtype=torch.bool)
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=m[:, None])


@pytest.mark.parametrize("layout", ["packed", "left_padded", "both"])
def test_span_attention_equals_the_dense_mask(layout):
    """Packed rows and left padding run per span (no [T x T] mask): equal to a dense-mask SDPA on every real token,
    in values and gradients."""
    g = torch.Generator().manual_seed(0)
    rows = {"packed": [[1] * 7 + [2] * 5 + [3] * 3 + [0] * 2, [1] * 9 + [2] * 8],
            "left_padded": [[0] * 6 + [1] * 11, [0] * 2 + [1] * 15, [1] * 17],
            "both": [[0] * 4 + [1] * 13, [1] * 5 + [2] * 12, [1] * 17]}[layout]
    seg = torch.tensor(rows)
    B, T = seg.shape
    q = torch.randn(B, 4, T, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(B, 2, T, 16, generator=g, requires_grad=True) for _ in range(2))
    spans = M.attention_spans(seg)
    assert spans is not None
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], 16) for t in (q, k, v)]
    got = M.span_attention(*flat, [(b * T + s, b * T + e) for b, s, e in spans], causal=True)
    got = got.view(B, T, 4, 16).transpose(1, 2)
    want = dense_mask_attention(q, k, v, seg)
    real = (seg > 0)[:, None, :, None]
    assert (got - want).abs().masked_select(real).max() < 1e-6
    assert (got.masked_select(~real) == 0).all()
    w = torch.randn(got.shape, generator=g) * real
    grads = [torch.autograd.grad((x * w).sum(), (q, k, v)) for x in (got, want)]
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-5
    assert M.attention_spans(torch.tensor([[1] * 5 + [0] * 3, [1] * 8])) is None  # right padding: causal alone


@pytest.mark.parametrize("onednn", [True, False])
def test_greedy_generation_equals_transformers(pair, onednn, monkeypatch):
    # generate runs its CPU fp32 products on oneDNN on AMD CPUs (model.ONEDNN_CPU_LINEAR), else on F.linear
    if onednn:
        assert M.ONEDNN_AVAILABLE, "this torch build has no oneDNN linear: the AMD CPU path is not tested"
    monkeypatch.setattr(M, "ONEDNN_CPU_LINEAR", onednn)
    ours, hf = pair
    cfg = ours.config
    pv, thw, ids, mask = two_image_prompts(cfg, [(84, 112), (56, 56)], "<|im_start|>user\n")
    mm = (ids == cfg.image_token_id).int()
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw,
                           mm_token_type_ids=mm, max_new_tokens=20, do_sample=False, eos_token_id=None)
    got = ours.generate(ids, mask, pv, thw, max_new_tokens=20, eos_token_ids=[])
    assert got.shape == (2, 20)
    assert torch.equal(got, want[:, ids.shape[1]:])


def test_generation_stops_per_row_and_pads(pair):
    ours, _ = pair
    cfg = ours.config
    ids, mask = left_pad([build_ids(cfg, ["The plane is"]), build_ids(cfg, ["12 storage tanks and"])],
                         cfg.pad_token_id)
    free = ours.generate(ids, mask, max_new_tokens=12, eos_token_ids=[])
    stop = int(free[0, 3])  # row 0 emits this token at step 3: make it an eos
    first = [int((free[r] == stop).nonzero()[0]) if (free[r] == stop).any() else None for r in range(2)]
    got = ours.generate(ids, mask, max_new_tokens=12, eos_token_ids=[stop])
    for r in range(2):
        if first[r] is None:
            assert torch.equal(got[r], free[r, :got.shape[1]])
        else:
            assert torch.equal(got[r, :first[r] + 1], free[r, :first[r] + 1])
            assert (got[r, first[r] + 1:] == cfg.pad_token_id).all()
    assert got.shape[1] == (12 if None in first else max(first) + 1)


def test_compiled_decode_gives_the_eager_greedy_tokens(tiny_ckpt):
    """compile_decode: the static-cache step compiled whole (fullgraph) decodes exactly what the eager step does,
    on left-padded prompts with an image and two samples each."""
    model = CK.load(tiny_ckpt[0])
    cfg = model.config
    pv, thw = oracle_images([(70, 98), (56, 56)])
    rows = [build_ids(cfg, ["user\n", int(thw[0].prod()) // 4, "Where is the runway?"]),
            build_ids(cfg, [int(thw[1].prod()) // 4, "Count the ships"])]
    ids, mask = left_pad(rows, cfg.pad_token_id)
    eager = model.generate(ids, mask, pv, thw, max_new_tokens=10, num_samples=2, eos_token_ids=[])
    compiled = model.compile_decode().generate(ids, mask, pv, thw, max_new_tokens=10, num_samples=2,
                                               eos_token_ids=[])
    assert model._decode_fn is not None and eager.shape == (4, 10)
    assert torch.equal(compiled, eager)


def test_int8_weights_predict_like_fp32(tiny_ckpt):
    """quantize="int8": every linear layer in int8 (a scale per output channel), the embedding too, compute in
    fp32; next-token logits within a few percent of fp32, the same top token almost everywhere."""
    path, _ = tiny_ckpt
    m32, m8 = CK.load(path), CK.load(path, quantize="int8")
    linears = [m for m in m8.modules() if isinstance(m, M.Linear)]
    assert linears and all(m.packed is not None and m.weight is None for m in linears)
    assert m8.model.embed_tokens.weight.dtype == torch.int8 and m8.dtype == torch.float32
    ids, pv, thw = sample_inputs(m32.config)
    with torch.no_grad():
        a, b = m32(ids, None, pv, thw), m8(ids, None, pv, thw)
    assert 1e-4 < rel_err(b, a) < 0.08  # int8 rounding through 2 layers and the vision tower: visible, small
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert m8.generate(ids, None, pv, thw, max_new_tokens=4).shape == (1, 4)
    with pytest.raises(ValueError, match="CPU"):
        CK.load(path, device="meta", quantize="int8")


def test_num_samples_encode_once_and_match_teacher_forcing(pair):
    """G samples per prompt: the vision tower runs once for the batch, each prompt's samples come from its own
    generator, and the returned log-probs equal a teacher-forced forward pass over prompt + completion."""
    ours, _ = pair
    cfg = ours.config
    pv, thw, ids, mask = two_image_prompts(cfg, [(84, 84), (56, 112)])
    calls = []
    h = ours.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
        new, lp = ours.generate(ids, mask, pv, thw, max_new_tokens=10, temperature=1.0, num_samples=3,
                                eos_token_ids=[], generator=gens, return_logprobs=True)
    finally:
        h.remove()
    assert len(calls) == 1 and new.shape == (6, 10)
    assert len({tuple(r) for r in new.tolist()}) > 1  # samples differ
    # prompt 1 alone with the same generator seed gives the same three samples
    alone = ours.generate(ids[1:, mask[1].argmax():], None, pv[int(thw[0].prod()):], thw[1:], max_new_tokens=10,
                          temperature=1.0, num_samples=3, eos_token_ids=[], generator=[torch.Generator().manual_seed(12)])
    assert torch.equal(alone, new[3:])
    # teacher forcing: log_softmax of the full forward pass at each sampled token
    full, fmask, pv_rep, thw_rep = prompt_completion_rows(ids, mask, pv, thw, new, torch.ones_like(new), 3)
    with torch.no_grad():
        logits = ours(full, fmask, pv_rep, thw_rep)[:, ids.shape[1] - 1:-1]
    want = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]
    assert (lp - want).abs().max() < 1e-4


def test_shared_prompt_logprobs_equal_full_rows_with_their_gradients(pair):
    """GRPO's update scores G completions per prompt with each prompt run once (SharedPrompts): the log-probs
    and every parameter's gradient equal those of rows [prompt | completion], left padding, completions cut at
    different lengths and a temperature included; the vision tower runs once on the prompts' own patches."""
    ours, _ = pair
    cfg = ours.config
    pv, thw, ids, mask = two_image_prompts(cfg, [(84, 84), (56, 112)])
    G, L, T = 3, 7, 0.7
    comp = torch.randint(10, 200, (2 * G, L), generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([L, 4, 1, L, 6, 2])  # tokens scored per completion (the rest: after its EOS)
    cmask = (torch.arange(L) < keep[:, None]).long()
    targets = comp.masked_fill(cmask == 0, -100)
    w = torch.randn(2 * G, L, generator=torch.Generator().manual_seed(1))  # any loss of the log-probs

    P = ids.shape[1]
    full, fmask, pv_rep, thw_rep = prompt_completion_rows(ids, mask, pv, thw, comp, cmask, G)
    ftargets = torch.full_like(full, -100)
    ftargets[:, P - 1:-1] = targets
    want = ours(full, fmask, pv_rep, thw_rep, targets=ftargets, temperature=T)[:, P - 1:-1]
    g_want = torch.autograd.grad((want * w).sum(), list(ours.parameters()))

    seen = []
    h = ours.visual.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        got = ours(ids, mask, pv, thw, completions=comp, targets=targets, temperature=T)
    finally:
        h.remove()
    g_got = torch.autograd.grad((got * w).sum(), list(ours.parameters()))
    assert seen == [pv.shape[0]]
    assert (got - want).abs().max() < 1e-5 and (got[cmask == 0] == 0).all() and (got[cmask == 1] < 0).all()
    assert max(rel_err(a, b) for a, b in zip(g_got, g_want)) < 1e-4
    # the temperature divides the logits: log softmax(logits / T) of a plain forward
    with torch.no_grad():
        logits = ours(full, fmask, pv_rep, thw_rep)[:, P - 1:-1]
    plain = torch.log_softmax(logits / T, -1).gather(-1, comp[..., None])[..., 0] * cmask
    assert (got.detach() - plain).abs().max() < 1e-4


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    for _ in range(20):
        tok, _ = M.sample_tokens(logits, 1.0, top_k=3)
        top3 = logits.topk(3, -1).indices
        assert (top3 == tok[:, None]).any(-1).all()
    probs = logits.softmax(-1)
    sp, order = probs.sort(-1, descending=True)
    keep = (sp.cumsum(-1) - sp) < 0.5
    for _ in range(20):
        tok, _ = M.sample_tokens(logits, 1.0, top_p=0.5)
        for r in range(4):
            allowed = set(order[r][keep[r]].tolist())
            assert int(tok[r]) in allowed
    greedy, _ = M.sample_tokens(logits, 0.0)
    assert torch.equal(greedy, logits.argmax(-1))


# -- checkpoints ----------------------------------------------------------------------------------------------


def sample_inputs(cfg):
    pv, thw = oracle_images([(70, 98)])
    ids = torch.tensor([build_ids(cfg, ["user\n", int(thw[0].prod()) // 4, "Where is the runway?"])])
    return ids, pv, thw


def test_tied_head_loads_without_lm_head(tiny_tied_ckpt):
    path, hf = tiny_tied_ckpt
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    ours = CK.load(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids, pv, thw = sample_inputs(ours.config)
    want, _ = hf_logits(hf, ids, None, pv, thw)
    with torch.no_grad():
        assert rel_err(ours(ids, None, pv, thw), want) < 1e-5


def test_our_checkpoint_loads_in_transformers(pair, tmp_path):
    ours, hf = pair
    from transformers import Qwen2VLForConditionalGeneration
    out = tmp_path / "saved"
    CK.save_model(ours, out)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # nothing half-written left behind
    assert os.path.exists(out / "tokenizer.json") and os.path.exists(out / "preprocessor_config.json")
    back = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids, pv, thw = sample_inputs(ours.config)
    want, _ = hf_logits(back, ids, None, pv, thw)
    with torch.no_grad():
        got = ours(ids, None, pv, thw)
    assert torch.equal(got, CK.load(out)(ids, None, pv, thw).detach())
    assert rel_err(got, want) < 1e-5
    # saving again over the same folder replaces it whole
    CK.save_model(ours, out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(out))


def rewrite_checkpoint(src, dst, flat_config=False, key_prefix=False, shard_bytes=None):
    """A copy of an HF checkpoint in another on-disk layout."""
    from safetensors.torch import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    for fn in os.listdir(src):
        if not fn.endswith(".safetensors") and fn != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, fn), os.path.join(dst, fn))
    sd = load_file(os.path.join(src, "model.safetensors"))
    if key_prefix:
        sd = {("model.language_model." + k[6:] if k.startswith("model.") else
               "model.visual." + k[7:] if k.startswith("visual.") else k): v for k, v in sd.items()}
    if flat_config:
        cfg = CK.config_from_json(json.load(open(os.path.join(src, "config.json"))))
        d = CK.config_to_json(cfg)
        d["vision_config"]["in_chans"] = d["vision_config"].pop("in_chans")
        json.dump(d, open(os.path.join(dst, "config.json"), "w"))
    if shard_bytes:
        keys, shards, cur, size = sorted(sd), [], {}, 0
        for k in keys:
            if cur and size > shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = sd[k]
            size += sd[k].numel() * 4
        shards.append(cur)
        wm = {}
        for i, s in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(s, os.path.join(dst, name))
            wm.update({k: name for k in s})
        json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(dst, "model.safetensors.index.json"), "w"))
    else:
        save_file(sd, os.path.join(dst, "model.safetensors"))
    return dst


@pytest.mark.parametrize("layout", ["flat_config", "prefixed_keys", "sharded"])
def test_other_layouts_load_to_identical_logits(pair, tiny_ckpt, tmp_path, layout):
    ours, hf = pair
    path, _ = tiny_ckpt
    dst = rewrite_checkpoint(path, str(tmp_path / layout), flat_config=layout == "flat_config",
                             key_prefix=layout == "prefixed_keys", shard_bytes=50_000 if layout == "sharded" else None)
    if layout == "flat_config":
        d = json.load(open(os.path.join(dst, "config.json")))
        assert "text_config" not in d and "hidden_size" in d
    if layout == "sharded":
        assert len({v for v in json.load(open(os.path.join(dst, "model.safetensors.index.json")))["weight_map"].values()}) > 2
    other = CK.load(dst)
    ids, pv, thw = sample_inputs(ours.config)
    with torch.no_grad():
        assert torch.equal(other(ids, None, pv, thw), ours(ids, None, pv, thw))
    if layout == "flat_config":  # transformers reads the flat layout too, to the same logits
        from transformers import Qwen2VLForConditionalGeneration
        back = Qwen2VLForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
        want, _ = hf_logits(back, ids, None, pv, thw)
        assert rel_err(other(ids, None, pv, thw).detach(), want) < 1e-5


def test_our_sharded_save_round_trips(pair, tmp_path):
    ours, _ = pair
    CK.save_model(ours, tmp_path / "s", max_shard_bytes=100_000)
    index = json.load(open(tmp_path / "s" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    back = CK.load(tmp_path / "s")
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_load_into_bfloat16(tiny_ckpt):
    path, _ = tiny_ckpt
    m32 = CK.load(path)
    m16 = CK.load(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids, pv, thw = sample_inputs(m32.config)
    with torch.no_grad():
        a, b = m32(ids, None, pv, thw), m16(ids, None, pv, thw).float()
    assert rel_err(b, a) < 0.05  # bf16 keeps 8 bits of mantissa: a few percent after a few layers


# -- bad input --------------------------------------------------------------------------------------------------


def test_missing_and_misshaped_tensors_are_listed_in_one_error(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = tiny_ckpt
    dst = rewrite_checkpoint(path, str(tmp_path / "broken"))
    sd = load_file(os.path.join(dst, "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"], sd["visual.merger.ln_q.bias"]
    sd["model.norm.weight"] = torch.ones(7)
    sd["model.layers.9.extra"] = torch.ones(1)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with pytest.raises(ValueError) as e:
        CK.load(dst)
    msg = str(e.value)
    for name in ["model.layers.1.mlp.up_proj.weight", "visual.merger.ln_q.bias", "model.norm.weight",
                 "model.layers.9.extra", "missing (2)", "unexpected (1)", "wrong shape (1)"]:
        assert name in msg


@pytest.mark.parametrize("damage", ["cut_in_half", "cut_in_header", "shard_cut_by_one_byte", "bytes_appended",
                                    "shape_does_not_fit_bytes"])
def test_damaged_safetensors_are_refused_naming_file_and_tensor(tiny_ckpt, tmp_path, damage):
    """An interrupted download must not load as zeros or garbage: safetensors' own validation runs first."""
    path, _ = tiny_ckpt
    dst = rewrite_checkpoint(path, str(tmp_path / damage), shard_bytes=50_000 if damage.startswith("shard") else None)
    files = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))
    victim = os.path.join(dst, files[len(files) // 2])
    raw = open(victim, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    if damage == "cut_in_half":
        raw = raw[:len(raw) // 2]
    elif damage == "cut_in_header":
        raw = raw[:8 + n // 2]
    elif damage == "shard_cut_by_one_byte":
        raw = raw[:-1]
    elif damage == "bytes_appended":
        raw = raw + b"\0" * 64
    else:  # the header claims a smaller first tensor than its byte range holds
        header[first]["shape"] = [1] * len(header[first]["shape"])
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        raw = len(text).to_bytes(8, "little") + text + raw[8 + n:]
    open(victim, "wb").write(raw)
    with pytest.raises(ValueError) as e:
        CK.load(dst)
    msg = str(e.value)
    assert victim in msg and "damaged safetensors file" in msg
    named = {"cut_in_half": "tensor ", "cut_in_header": "header is cut short", "shard_cut_by_one_byte": last,
             "bytes_appended": "", "shape_does_not_fit_bytes": first}[damage]
    assert named in msg, msg


def test_config_that_is_not_qwen2_vl_is_refused(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    dst = rewrite_checkpoint(path, str(tmp_path / "other"))
    d = json.load(open(os.path.join(dst, "config.json")))
    d["model_type"] = "qwen2_5_vl"
    json.dump(d, open(os.path.join(dst, "config.json"), "w"))
    with pytest.raises(ValueError, match="not Qwen2-VL"):
        CK.load(dst)
    with pytest.raises(FileNotFoundError, match="config.json"):
        CK.load(str(tmp_path))


def test_image_token_mismatch_and_position_limit_are_errors(pair):
    ours, _ = pair
    cfg = ours.config
    pv, thw = oracle_images([(56, 84)])
    n = int(thw[0].prod()) // 4
    ids = torch.tensor([build_ids(cfg, ["a", n - 1, "b"])])
    with pytest.raises(ValueError, match="image tokens"):
        ours(ids, None, pv, thw)
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        ours(torch.tensor([build_ids(cfg, ["a", n, "b"])]))
    with pytest.raises(ValueError, match="patches"):
        ours(torch.tensor([build_ids(cfg, ["a", n, "b"])]), None, pv[:-4], thw)
    long_ids = torch.full((1, cfg.max_position_embeddings + 1), 5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(long_ids)
    with pytest.raises(ValueError, match="past the model's limit"):
        ours.generate(torch.full((1, cfg.max_position_embeddings - 4), 5), max_new_tokens=10)


def test_hub_id_is_fetched_only_when_not_a_folder(tiny_ckpt, monkeypatch):
    path, _ = tiny_ckpt
    import huggingface_hub
    asked = []

    def fake_download(repo_id, **kw):
        asked.append(repo_id)
        return path
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    CK.load(path)
    assert asked == []
    m = CK.load("someone/tinyrs-r1")
    assert asked == ["someone/tinyrs-r1"] and m.source_dir == path


def test_command_line_answers_about_an_image(tiny_ckpt, tmp_path, capsys):
    """`python ask.py --model DIR --image F "question"` prints what generate + decode give."""
    path, _ = tiny_ckpt
    from data import Processor
    rng = np.random.default_rng(3)
    img_path = tmp_path / "scene.png"
    Image.fromarray((rng.random((70, 100, 3)) * 255).astype("uint8")).save(img_path)
    ask.main(["--model", path, "--image", str(img_path), "--max-new-tokens", "12", "How many ships?"])
    printed = capsys.readouterr().out.strip()
    proc = Processor.from_pretrained(path)
    m = CK.load(path)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": "How many ships?"}]}],
                                    add_generation_prompt=True)
    b = proc(text=[text], images=[Image.open(img_path)])
    new = m.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"], max_new_tokens=12)
    assert printed == proc.decode(new[0]).strip() and len(new[0]) > 0
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ask.main(["--model", path, "--image", str(tmp_path / "missing.png"), "What?"])


def test_onednn_linear_only_under_inference_mode(monkeypatch):
    monkeypatch.setattr(M, "ONEDNN_CPU_LINEAR", True)  # the AMD path, whatever CPU runs the test
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in [(3, 5, 64), (96, 64), (96,)])
    want = F.linear(x, w, b)
    with torch.no_grad():
        assert torch.equal(M.linear(x, w, b), want)  # a plain forward is bit-identical with and without grad
    with torch.inference_mode():
        got = M.linear(x.transpose(0, 1), w, b).transpose(0, 1)  # non-contiguous input
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_target_logprobs_equal_full_logits_and_their_gradients(pair):
    ours, _ = pair
    cfg = ours.config
    a, b = build_ids(cfg, ["Is there a ship near the harbour? yes"]), build_ids(cfg, ["Classify the scene: forest"])
    n = min(len(a), len(b))
    ids = torch.tensor([a[:n], b[:n]])
    targets = ids[:, 1:].clone()
    targets[0, :3] = -100
    targets[1, -2:] = -100
    x = ids[:, :-1]
    lp = ours(x, targets=targets, chunk_size=5)
    full = torch.log_softmax(ours(x), -1)
    want = full.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    assert (lp - want).abs().max() < 1e-5 and (lp[targets == -100] == 0).all()
    g1 = torch.autograd.grad(lp.sum(), ours.lm_head.weight)[0]
    g2 = torch.autograd.grad(want.sum(), ours.lm_head.weight)[0]
    assert rel_err(g1, g2) < 1e-5
