"""Stages P/S/C: conversation data, labels, batching (data.py) and the FSDP2 loop (train_sft.py) on tiny models."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data as D
import checkpoint as CK
import model as M
import synth
import train_sft as T
import training as TR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXELS = ["--min-pixels", str(56 * 56), "--max-pixels", str(28 * 28 * 64)]
SIZES = [(56, 56), (56, 112), (112, 84), (84, 84)]  # -> 4, 8, 12, 9 image tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny steps on a shared 2-core machine: extra intra-op threads only contend (10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def proc(tiny_ckpt):
    return D.Processor.from_pretrained(tiny_ckpt[0])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
    return str(root)


def write(path, recs, jsonl=True):
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        else:
            json.dump(recs, f, indent=1)
    return str(path)


def conv(*turns, image=None, **extra):
    roles = {"h": "human", "g": "gpt", "s": "system"}
    rec = {"conversations": [{"from": roles[t[0]], "value": t[1]} for t in turns], **extra}
    if image is not None:
        rec["image"] = image
    return rec


def learned_runs(item):
    """Decoded text of each contiguous run of labelled tokens."""
    lab = item["labels"]
    on = (lab != D.IGNORE_INDEX).tolist() + [False]
    runs, start = [], None
    for i, o in enumerate(on):
        if o and start is None:
            start = i
        elif not o and start is not None:
            runs.append(lab[start:i].tolist())
            start = None
    return runs


def one_item(proc, tmp_path, rec, **kw):
    ds = D.ConversationDataset(write(tmp_path / "one.jsonl", [rec]), proc, kw.pop("image_root", None), **kw)
    return ds, ds[0]


# ----------------------------------------------------------------------------------------------------------------
# Labels (acceptance 1)


def test_labels_single_turn_image_at_start_default_system(proc, images, tmp_path):
    rec = conv(("h", "<image>\n{VQA} Is there a ship?"), ("g", "yes"), image="1.png")
    ds, item = one_item(proc, tmp_path, rec, image_root=images)
    ids, labels = item["input_ids"], item["labels"]
    msgs, _ = D.conversation_messages(rec)
    text = proc.apply_chat_template(msgs)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|>{VQA} Is there a ship?<|im_end|>")
    # the training ids are exactly what inference sees: the processor's prompt, then answer, <|im_end|>, "\n"
    prompt = proc(proc.apply_chat_template(msgs[:1], add_generation_prompt=True),
                  [os.path.join(images, "1.png")])["input_ids"][0]
    answer = proc.encode("yes<|im_end|>\n")
    assert ids.tolist() == prompt.tolist() + answer
    assert (ids == proc.image_token_id).sum() == 8
    assert [proc.decode(r, skip_special_tokens=False) for r in learned_runs(item)] == ["yes<|im_end|>"]
    assert labels[-1] == D.IGNORE_INDEX and proc.decode(ids[-1:], False) == "\n"  # the newline is not learned
    assert (labels[labels != D.IGNORE_INDEX] == ids[labels != D.IGNORE_INDEX]).all()
    assert item["image_grid_thw"].tolist() == [[1, 4, 8]] and ds.samples[0].task == "VQA"


def test_labels_multi_turn_system_turn_image_mid_text(proc, images, tmp_path):
    rec = conv(("s", "You are an RS analyst."), ("h", "Compare the left part\n<image>\nwith the rest."),
               ("g", "The left part is water."), ("h", "How many ships?"), ("g", "3 ships [[1, 2, 3, 4]]."),
               image="0.png", task="counting")
    _, item = one_item(proc, tmp_path, rec, image_root=images)
    text = proc.decode(item["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are an RS analyst.<|im_end|>\n<|im_start|>user\nCompare the "
                           "left part<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>with the rest.")
    assert "You are a helpful assistant" not in text
    assert [proc.decode(r, skip_special_tokens=False) for r in learned_runs(item)] == [
        "The left part is water.<|im_end|>", "3 ships [[1, 2, 3, 4]].<|im_end|>"]
    assert D.task_of(rec, D.conversation_messages(rec)[0]) == "counting"


def test_labels_without_image_and_custom_system_prompt(proc, tmp_path):
    rec = conv(("h", "{CLS} Name a scene class."), ("g", "forest"))
    _, item = one_item(proc, tmp_path, rec, system_prompt=D.REASONING_SYSTEM_PROMPT)
    text = proc.decode(item["input_ids"], skip_special_tokens=False)
    assert text == proc.apply_chat_template(D.conversation_messages(rec)[0], system_prompt=D.REASONING_SYSTEM_PROMPT)
    assert item["pixel_values"] is None
    assert [proc.decode(r, skip_special_tokens=False) for r in learned_runs(item)] == ["forest<|im_end|>"]


def test_images_without_placeholders_go_first_and_several_images(proc, images, tmp_path):
    rec = conv(("h", "Which image has more water?"), ("g", "The second."), image=["0.png", "3.png"])
    msgs, paths = D.conversation_messages(rec)
    assert [p.get("type") for p in msgs[0]["content"]] == ["image", "image", "text"] and paths == ["0.png", "3.png"]
    _, item = one_item(proc, tmp_path, rec, image_root=images)
    assert (item["input_ids"] == proc.image_token_id).sum() == 4 + 9 and len(item["image_grid_thw"]) == 2
    with pytest.raises(D.DataError, match="1 <image> placeholders but 2 images"):
        D.conversation_messages(conv(("h", "<image> which?"), ("g", "a"), image=["0.png", "1.png"]), "f: record 0")


# ----------------------------------------------------------------------------------------------------------------
# Truncation, balancing, sharding, collation


def test_truncation_never_cuts_an_image(proc, images, tmp_path):
    long_answer = " ".join(["harbour"] * 60)
    recs = [conv(("h", "<image>\nDescribe."), ("g", long_answer), image="2.png"),  # cut inside the answer
            conv(("h", "Describe " * 30 + "<image>"), ("g", "ok"), image="2.png"),  # cut would split the image
            conv(("h", "<image>" + " word" * 60), ("g", "ok"), image="0.png"),  # cut before any label
            conv(("h", "<image>\nShort."), ("g", "fine"), image="0.png")]
    ds = D.ConversationDataset(write(tmp_path / "t.jsonl", recs), proc, images, max_len=48)
    assert ds.stats == {"records": 4, "bad": 0, "too_long_image": 1, "too_long_no_labels": 1, "truncated": 1,
                        "repeated": 0}
    assert len(ds) == 2
    cut = ds[0]
    assert len(cut["input_ids"]) == 48 and (cut["input_ids"] == proc.image_token_id).sum() == 12
    assert (cut["labels"] != D.IGNORE_INDEX).sum() == ds.samples[0].n_labels > 0
    assert ds.lengths[1] == len(ds[1]["input_ids"]) < 48


def test_task_balancing_and_deterministic_epochs():
    tasks = ["CLS"] * 50 + ["VG"] * 4 + ["VQA"] * 20
    f = T.balance_factors(tasks, 5)
    assert f == {"CLS": 1.0, "VG": 5.0, "VQA": 2.5}
    counts = T.balanced_counts(tasks, f)
    assert counts == {"CLS": 50, "VG": 20, "VQA": 50}
    e0 = T.epoch_order(tasks, 0, seed=3, factors=f)
    assert e0 == T.epoch_order(tasks, 0, seed=3, factors=f) != T.epoch_order(tasks, 1, seed=3, factors=f)
    got = {t: sum(tasks[i] == t for i in e0) for t in counts}
    assert got == counts
    assert sorted(i for i in e0 if tasks[i] == "VG") == sorted(list(range(50, 54)) * 5)
    assert sorted(T.epoch_order(10, 2, seed=0)) == list(range(10))


def test_rank_sharding_covers_each_global_batch_once():
    order = list(range(37))
    lengths = [(i * 7) % 11 for i in order]
    one = T.rank_steps(order, 8, 2, 0, 1, lengths)
    two = [T.rank_steps(order, 8, 2, r, 2, lengths) for r in range(2)]
    assert len(one) == 4 and len(two[0]) == len(two[1]) == 4  # the partial last batch is dropped
    for s in range(4):
        mine = [i for mb in one[s] for i in mb]
        theirs = [i for r in range(2) for mb in two[r][s] for i in mb]
        assert sorted(mine) == sorted(theirs) == order[8 * s:8 * s + 8]
        assert all(len(mb) == 2 for mb in two[0][s] + two[1][s])
        assert all(lengths[a] >= lengths[b] for a, b in zip(mine, mine[1:]))  # longest first: less padding
    with pytest.raises(ValueError, match="must split"):
        T.rank_steps(order, 8, 3, 0, 2)


def test_pack_rows_fewest_balanced_rows():
    lengths = [150, 100, 100, 50, 40, 10]
    rows = D.pack_rows(lengths, 250)
    loads = sorted(sum(lengths[i] for i in r) for r in rows)
    assert loads == [150, 150, 150]  # 450 slots; 2 balanced rows need 2 x 240, first-fit's 250 + 200 2 x 250
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert D.pack_rows([100] + [10] * 7, 200) == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert len(D.pack_rows([120, 120, 120], 200)) == 3
    assert len(D.pack_rows([60, 58, 57, 56, 55], 128)) == 5  # 3 rows of ~116 would pad more than 5 of 60
    with pytest.raises(ValueError, match="does not fit"):
        D.pack_rows([300], 200)


def test_collate_padding_and_packing_keep_samples_apart(proc, images, tmp_path, tiny_ckpt):
    recs = [conv(("h", f"<image>\nQuestion {i}?"), ("g", "answer " * (1 + 5 * i)), image=f"{i % 4}.png")
            for i in range(5)]
    ds = D.ConversationDataset(write(tmp_path / "c.jsonl", recs), proc, images, max_len=128)
    items = [ds[i] for i in range(5)]
    padded = D.collate(items, proc.pad_id)
    packed = D.collate(items, proc.pad_id, pack_len=128)
    assert padded["input_ids"].shape[0] == 5 and packed["input_ids"].shape[0] < 5
    assert packed["attention_mask"].max() > 1 and (packed["attention_mask"] > 0).sum(-1).max() <= 128
    assert (padded["attention_mask"] > 0).sum() == (packed["attention_mask"] > 0).sum()
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    # images in the row-major order of their tokens
    seen = []
    for r in range(packed["input_ids"].shape[0]):
        seg = packed["attention_mask"][r]
        for k in range(1, int(seg.max()) + 1):
            n = int((packed["input_ids"][r][seg == k] == proc.image_token_id).sum())
            seen.append(n)
    assert seen == (packed["image_grid_thw"].prod(-1) // 4).tolist()
    # the model gives every sample the same log-probabilities packed or padded
    model = CK.load(tiny_ckpt[0])

    def logps(b):
        tgt = F.pad(b["labels"][:, 1:], (0, 1), value=D.IGNORE_INDEX)
        with torch.no_grad():
            lp = model(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"], targets=tgt)
        return sorted(lp[tgt != D.IGNORE_INDEX].tolist())

    a, b = logps(padded), logps(packed)
    assert len(a) == sum(s.n_labels for s in ds.samples) and np.allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Bad data (acceptance 7)


def test_bad_data_errors_name_file_record_and_line(proc, images, tmp_path):
    good = conv(("h", "<image>\nQ?"), ("g", "A"), image="0.png")
    missing = conv(("h", "<image>\nQ?"), ("g", "A"), image="nope.png", id="m1")
    path = write(tmp_path / "bad.json", [good, good, missing], jsonl=False)
    with pytest.raises(D.DataError, match=r"bad\.json: record 2 \(id m1\): image file not found: .*nope\.png"):
        D.ConversationDataset(path, proc, images)
    ds = D.ConversationDataset(path, proc, images, skip_bad=True)
    assert len(ds) == 2 and ds.stats["bad"] == 1 and "nope.png" in ds.bad_examples[0]

    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps(good) + "\n\n" + '{"conversations": [oops\n' + json.dumps(good) + "\n")
    with pytest.raises(D.DataError, match=r"bad\.jsonl: line 3: malformed JSON"):
        D.ConversationDataset(str(jl), proc, images)
    ds = D.ConversationDataset(str(jl), proc, images, skip_bad=True)
    assert len(ds) == 2 and ds.stats["bad"] == 1

    (tmp_path / "broken.json").write_text('[\n {"conversations": []},\n {"image": ]\n]')
    with pytest.raises(D.DataError, match=r"broken\.json: malformed JSON at line 3"):
        D.ConversationDataset(str(tmp_path / "broken.json"), proc, images)

    no_answer = write(tmp_path / "q.jsonl", [good, conv(("h", "Only a question"))])
    with pytest.raises(D.DataError, match=r"q\.jsonl: record 1 \(line 2\): no assistant .* refused"):
        D.ConversationDataset(no_answer, proc, images)
    with pytest.raises(D.DataError, match="turn 0 needs 'from'"):
        D.conversation_messages({"conversations": [{"from": "robot", "value": "x"}]})


def test_answer_opening_with_a_line_break_is_learned_whole_and_prompts_match_generation():
    """Qwen2's tokenizer merges "\\n\\n" into one token; an answer that opens with a line break must not fuse
    with the header's "\\n", or training learns a token that generation (prompt ends "assistant\\n") never sees."""
    corpus = ["Line one.\n\nLine two.\n\n\nThe answer is 3.\n\nDone.", "assistant\n\nThe ships\n\nare moored."] * 8
    proc = D.Processor(synth.train_tokenizer(corpus, vocab_size=400))
    merged = proc.tokenizer.encode("assistant\n\nThe", add_special_tokens=False).tokens
    assert "ĊĊ" in merged  # the premise: this tokenizer fuses the two line breaks, as Qwen2's does
    msgs = [{"role": "user", "content": "How many ships?"}, {"role": "assistant", "content": "\nThe answer is 3."},
            {"role": "user", "content": "And planes?"}, {"role": "assistant", "content": "\n\nNone."}]
    ids, learn = D.tokenize_conversation(proc, msgs)
    runs, cur = [], []
    for i, on in zip(ids.tolist() + [None], learn.tolist() + [False]):
        if on:
            cur.append(i)
        elif cur:
            runs.append(proc.decode(cur, skip_special_tokens=False))
            cur = []
    assert runs == ["\nThe answer is 3.<|im_end|>", "\n\nNone.<|im_end|>"]
    for turn in (1, 3):  # the ids before each answer are that turn's generation prompt, token for token
        prompt = proc(proc.apply_chat_template(msgs[:turn], add_generation_prompt=True))["input_ids"][0].tolist()
        assert ids[:len(prompt)].tolist() == prompt and learn[len(prompt)] and not learn[len(prompt) - 1]


def one_step_args(ckpt, data_path, images, out, *extra):
    return ["--model", ckpt, "--data", data_path, "--image-root", images, "--out", str(out), "--max-steps", "1",
            "--global-batch", "2", "--micro-batch", "2", "--lr", "1e-3", "--workers", "0", "--max-len", "128",
            *PIXELS, *extra]


def vhm_tree(root, images):
    """VHM's own layout: DATA_PATH/<source_dataset>/<image>, the JSON naming the sub-folder per record."""
    for sub, i in (("UCM", 0), ("RSVQA_LR", 1), ("DOTA-train", 2)):
        os.makedirs(root / sub, exist_ok=True)
        Image.open(os.path.join(images, f"{i}.png")).save(root / sub / f"img{i}.png")
    return str(root)


def test_vhm_source_dataset_layout_and_tinyrs_relative_paths(proc, images, tmp_path):
    root = vhm_tree(tmp_path / "vhm", images)
    vhm = conv(("h", "<image>\n{CLS} Classify."), ("g", "forest"), image="img0.png", source_dataset="UCM")
    tinyrs = conv(("h", "<image>\n{VQA} Any?"), ("g", "no"), image="RSVQA_LR/img1.png", source_dataset="RSVQA_LR")
    plain = conv(("h", "<image>\n{VQA} Any?"), ("g", "yes"), image="DOTA-train/img2.png")
    ds = D.ConversationDataset(write(tmp_path / "mix.json", [vhm, tinyrs, plain], jsonl=False), proc, root)
    assert [s.images for s in ds.samples] == [[os.path.join(root, "UCM", "img0.png")],
                                              [os.path.join(root, "RSVQA_LR", "img1.png")],
                                              [os.path.join(root, "DOTA-train", "img2.png")]]
    lost = conv(("h", "<image>\nQ?"), ("g", "A"), image="gone.png", source_dataset="UCM")
    with pytest.raises(D.DataError, match=r"record 0: image file not found: .*UCM/gone\.png \(nor .*vhm/gone\.png\)"):
        D.ConversationDataset(write(tmp_path / "lost.json", [lost], jsonl=False), proc, root)


def test_vhm_original_files_train_a_step_and_a_prebalanced_file_is_reported(tiny_ckpt, images, tmp_path, capsys):
    """VHM's pre-training captions and instruction file, in their own layout, train with no bad record; a file
    that repeats records (already oversampled) is reported before balancing replicates it again."""
    root = vhm_tree(tmp_path / "vhm", images)
    pre = [conv(("h", "<image>\nDescribe the image in detail."), ("g", f"An aerial scene number {i}."),
                image=f"img{i % 3}.png", source_dataset=("UCM", "RSVQA_LR", "DOTA-train")[i % 3]) for i in range(4)]
    sft = [conv(("h", "<image>\n{CLS} Classify the scene."), ("g", "forest"), ("h", "{VQA} Is there water?"),
                ("g", "no"), image="img0.png", source_dataset="UCM"),
           conv(("h", "<image>\n{VG} the plane"), ("g", "[[10, 20, 300, 400]]"), image="img2.png",
                source_dataset="DOTA-train")]
    for stage, recs in (("pretrain", pre), ("sft", sft + sft)):  # the instruction file repeats both records
        out = tmp_path / stage
        T.main(one_step_args(tiny_ckpt[0], write(tmp_path / f"{stage}.json", recs, jsonl=False), root, out,
                             "--stage", stage))
        assert [r["step"] for r in metrics(out)] == [1]
        log = capsys.readouterr().out
        assert "'bad': 0" in log
        assert ("2 records repeat an earlier one" in log and "--no-balance" in log) == (stage == "sft")


def truncated_png(path, size=(84, 84)):
    """A PNG whose header reads (size known to the scan) but whose pixels do not decode."""
    Image.fromarray((np.random.default_rng(1).random((*size, 3)) * 255).astype("uint8")).save(path)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) // 2])
    with Image.open(path) as im:
        assert im.size == size
    return path


def test_image_failing_mid_training_is_skipped_and_counted(proc, tiny_ckpt, images, tmp_path):
    root = tmp_path / "imgs"
    os.makedirs(root)
    Image.open(os.path.join(images, "3.png")).save(root / "good.png")  # 84x84, as the bad one
    truncated_png(root / "bad.png")
    good = conv(("h", "<image>\n{CLS} Classify."), ("g", "forest"), image="good.png")
    bad = conv(("h", "<image>\n{CLS} Classify."), ("g", "harbour"), image="bad.png", id="b7")
    path = write(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(D.DataError, match=r"d\.jsonl: record 1 \(line 2\) \(id b7\): cannot read image file .*bad\.png"):
        D.ConversationDataset(path, proc, str(root))[1]
    ds = D.ConversationDataset(path, proc, str(root), skip_bad=True)
    item = ds[1]
    assert "bad.png" in item["skipped"] and (item["labels"] == D.IGNORE_INDEX).all()
    assert item["image_grid_thw"].tolist() == [[1, 6, 6]] and item["pixel_values"].abs().sum() == 0
    assert item["pixel_values"].shape == ds[0]["pixel_values"].shape  # 84x84 -> 6x6 patches, like the good one
    # The blanked sample adds no label and no gradient: the step equals one on the good sample twice.
    runs = {}
    for name, recs, extra in (("skip", [good, bad], ["--skip-bad"]), ("twice", [good, good], [])):
        out = tmp_path / name
        T.main(one_step_args(tiny_ckpt[0], write(tmp_path / f"{name}.jsonl", recs), str(root), out, "--no-balance",
                             *extra))
        runs[name] = metrics(out)
    assert runs["skip"][0]["skipped"] == 1 and runs["twice"][0]["skipped"] == 0
    assert_close(runs["skip"], runs["twice"])


# ----------------------------------------------------------------------------------------------------------------
# Optimizer pieces


def test_param_groups_freezing_and_schedule(tiny_ckpt):
    m = CK.load(tiny_ckpt[0])
    TR.freeze(m, vision=True)
    groups = {g["name"]: g for g in TR.param_groups(m, 1e-3, merger_lr=5e-4, vision_lr=1e-4, weight_decay=0.1)}
    assert set(groups) == {"llm", "llm_no_decay", "merger", "merger_no_decay"}  # frozen vision is left out
    names = {id(p): n for n, p in m.named_parameters()}
    nd = [names[id(p)] for p in groups["llm_no_decay"]["params"]]
    assert any("layernorm" in n for n in nd) and any(n.endswith("q_proj.bias") for n in nd)
    assert all(p.ndim >= 2 for p in groups["llm"]["params"]) and groups["llm_no_decay"]["weight_decay"] == 0.0
    assert groups["merger"]["lr"] == 5e-4 and groups["llm"]["weight_decay"] == 0.1
    assert not any(n.startswith("visual.blocks") for g in groups.values() for n in map(names.get, map(id, g["params"])))
    f = [TR.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0 and f[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and 0 < f[99] < 1e-3


# ----------------------------------------------------------------------------------------------------------------
# The training loop (acceptance 2-5)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("sft")
    qs = [("{CLS} Classify the scene.", ["forest", "harbour", "farmland"]), ("{VQA} Is there a building?",
                                                                               ["yes", "no"]),
          ("{VG} Locate the plane.", ["[[120, 340, 560, 780]]", "[[10, 20, 30, 40]]"])]
    rng = np.random.default_rng(0)
    recs = []
    for i in range(24):
        q, answers = qs[i % 3] if i % 5 else qs[0]
        turns = [("h", f"<image>\n{q}"), ("g", answers[int(rng.integers(len(answers)))])]
        if i % 4 == 0:
            turns += [("h", "Describe the image."), ("g", "A satellite image of a harbour with 3 ships.")]
        recs.append(conv(*turns, image=f"{i % 4}.png", id=f"r{i}"))
    path = write(root / "train.jsonl", recs)
    # 8 samples that can be learned exactly: each image/question pair has one answer
    small = [conv(("h", f"<image>\n{qs[i % 3][0]} #{i}"), ("g", qs[i % 3][1][i % 2]), image=f"{i % 4}.png")
             for i in range(8)]
    return path, write(root / "train8.jsonl", small), root


def base_args(ckpt, data_path, images, out, *extra):
    return ["--model", ckpt, "--data", data_path, "--image-root", images, "--out", str(out), "--max-steps", "6",
            "--global-batch", "4", "--micro-batch", "2", "--lr", "1e-3", "--workers", "0", "--max-len", "128",
            *PIXELS, *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_close(a, b, keys=("loss", "grad_norm"), rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            assert abs(ra[k] - rb[k]) <= rel * abs(rb[k]), (k, ra["step"], ra[k], rb[k])


@pytest.fixture(scope="module")
def baseline(tiny_ckpt, train_data, images, tmp_path_factory):
    """One process, 6 steps, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("base")
    final = T.main(base_args(tiny_ckpt[0], train_data[0], images, out, "--save-every", "2"))
    return out, final


def test_metrics_and_first_loss_is_token_mean_of_global_batch(baseline, tiny_ckpt, proc, train_data, images):
    out, final = baseline
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and final == os.path.join(out, "final")
    for r in rows:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb"} <= set(r) and r["tokens_per_s"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    # step 1, recomputed with full logits: sum of per-token CE over the global batch / its label tokens
    ds = D.ConversationDataset(train_data[0], proc, images, max_len=128)
    order = T.epoch_order(ds.tasks, 0, 0, T.balance_factors(ds.tasks, 5.0))[:4]
    model = CK.load(tiny_ckpt[0])
    total, n = 0.0, 0
    for i in order:
        it = ds[i]
        with torch.no_grad():
            logits = model(it["input_ids"][None], None, it["pixel_values"], it["image_grid_thw"])[0]
        total += F.cross_entropy(logits[:-1], it["labels"][1:], reduction="sum").item()
        n += int((it["labels"][1:] != D.IGNORE_INDEX).sum())
    assert rows[0]["label_tokens"] == n and rows[0]["loss"] == pytest.approx(total / n, rel=1e-5)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_two_ranks_equal_one_process(baseline, tiny_ckpt, train_data, images, tmp_path, grad_ckpt):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_sft.py"),
           *base_args(tiny_ckpt[0], train_data[0], images, out, "--micro-batch", "1",
                      *(["--grad-ckpt"] if grad_ckpt else []))]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close(metrics(out), metrics(baseline[0]))


def torchrun(*script_args, nproc=2, timeout=300, cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script_args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("bf16", [False, True])
def test_ranks_with_and_without_images_agree_with_one_process(tiny_ckpt, images, tmp_path, bf16):
    """One sample with an image, one text-only, a micro-batch each: at every step one rank has an image and the
    other none. Both run the vision tower (a blank image with weight 0 on the text-only rank), and the losses
    equal those of one process that sees both samples."""
    recs = [conv(("h", "<image>\n{CLS} Classify the scene."), ("g", "forest"), image="1.png"),
            conv(("h", "{VQA} Is water wet?"), ("g", "yes, it is"))]
    data = write(tmp_path / "mixed.jsonl", recs)

    def args(out):
        return [*one_step_args(tiny_ckpt[0], data, images, out, "--no-balance", "--micro-batch", "1", "--max-steps",
                               "3"), *(["--bf16"] if bf16 else [])]
    T.main(args(tmp_path / "one"))
    r = torchrun(os.path.join(ROOT, "train_sft.py"), *args(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close(metrics(tmp_path / "two"), metrics(tmp_path / "one"), rel=1e-3 if bf16 else 1e-5)


LOAD_TWO_RANKS = """
import json, resource, sys
sys.path.insert(0, {root!r})
out = {out!r}
import distributed as DI
d = DI.setup_distributed("cpu")
base = int(open("/proc/self/statm").read().split()[1]) * 4096
model = DI.load_sharded({ckpt!r}, d, bf16=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
local = sum(p.to_local().numel() * 4 for p in model.parameters())
with open(f"{{out}}/rank{{d.rank}}.json", "w") as f:  # a file each: two ranks' prints may interleave
    json.dump({{"rank": d.rank, "over_base": peak - base, "local": local}}, f)
DI.teardown_distributed()
"""


def test_start_up_holds_no_full_copy_on_any_rank(tmp_path):
    """Rank 0 reads the checkpoint a tensor at a time and broadcasts it; no rank ever holds more than its shards
    plus a tensor in flight (each rank used to load the whole model first)."""
    cfg = {"model_type": "qwen2_vl", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16,
           "num_attention_heads": 12, "num_key_value_heads": 12, "vocab_size": 8192, "tie_word_embeddings": True,
           "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
           "vision_config": {"depth": 1, "embed_dim": 64, "num_heads": 2, "hidden_size": 512}}
    m = M.init_weights(M.Qwen2VL.empty(CK.config_from_json(cfg)))
    size = sum(p.numel() * 4 for p in m.parameters())
    largest = max(p.numel() * 4 for p in m.parameters())
    CK.save_model(m, tmp_path / "ckpt")
    del m
    (tmp_path / "load.py").write_text(LOAD_TWO_RANKS.format(root=ROOT, ckpt=str(tmp_path / "ckpt"),
                                                            out=str(tmp_path)))
    r = torchrun(str(tmp_path / "load.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{k}.json")) for k in (0, 1)]
    assert size > 500e6 and largest < size / 8  # ~150M parameters, no tensor dominating
    for r in ranks:  # its half (0.5 x size; the measure sees it) plus a tensor in flight; a full copy is >= size
        assert r["local"] <= size / 2 + 1024 and r["local"] <= r["over_base"] < 0.8 * size, ranks


def test_a_rank_that_cannot_see_out_stops_every_rank(tiny_ckpt, train_data, images, tmp_path):
    """Two "nodes" (two processes in different folders) given a relative --out, as a multi-node run without a
    shared OUT: both stop at start with an error that says what to do, rather than hang at the first checkpoint."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sft.py"),
                                       *base_args(tiny_ckpt[0], train_data[0], images, "run")],
                                      cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode != 0
        assert "rank 1 on" in err and "cannot see the files rank 0 writes there" in err and "--out" in err, err[-2000:]
    assert not (tmp_path / "node0" / "run" / "metrics.jsonl").exists()


def test_save_dtype_bf16_loads_in_transformers_and_the_default_keeps_the_source_dtype(tiny_ckpt, train_data, images,
                                                                                       tmp_path):
    from transformers import Qwen2VLForConditionalGeneration
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--save-dtype", "bf16"])):
        out = tmp_path / name
        T.main(base_args(tiny_ckpt[0], train_data[0], images, out, "--max-steps", "2", *extra))
        runs[name] = out / "final"
    assert json.load(open(runs["fp32"] / "config.json"))["torch_dtype"] == "float32"  # tiny_ckpt is stored fp32
    assert json.load(open(runs["bf16"] / "config.json"))["torch_dtype"] == "bfloat16"
    ratio = os.path.getsize(runs["bf16"] / "model.safetensors") / os.path.getsize(runs["fp32"] / "model.safetensors")
    assert 0.49 < ratio < 0.52
    ids = torch.tensor([[5, 17, 40, 3, 99, 12, 7]])
    logits = {}
    for name, path in runs.items():
        hf = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = hf(input_ids=ids).logits
    err = (logits["bf16"] - logits["fp32"]).abs().max() / logits["fp32"].abs().max()
    assert 1e-6 < err < 2e-2  # bf16 rounding of the weights: visible, small
    # a run that starts from a bf16 checkpoint exports bf16 by default
    src16 = tmp_path / "src16"
    CK.save_model(CK.load(tiny_ckpt[0], dtype=torch.bfloat16), src16)
    T.main(base_args(str(src16), train_data[0], images, tmp_path / "from16", "--max-steps", "1"))
    assert CK.checkpoint_dtype(tmp_path / "from16" / "final") == torch.bfloat16


def test_compiled_blocks_train_like_eager_ones(tiny_ckpt, train_data, images, tmp_path):
    """--compile (every decoder layer and vision block compiled before sharding, with activation checkpointing):
    the same losses and gradient norms as the eager run, within fp32 tolerance."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        T.main(base_args(tiny_ckpt[0], train_data[1], images, tmp_path / name, "--grad-ckpt", "--max-steps", "2",
                         *extra))
        runs[name] = metrics(tmp_path / name)
    assert_close(runs["compiled"], runs["eager"], rel=1e-4)


def test_resume_reproduces_the_uninterrupted_losses(baseline, tiny_ckpt, train_data, images, tmp_path):
    out = tmp_path / "resume"
    args = base_args(tiny_ckpt[0], train_data[0], images, out, "--save-every", "2", "--keep", "1")
    assert T.main(args + ["--stop-after", "3"]) is None  # "interrupted" after step 3; checkpoint-2 is the newest
    assert sorted(os.listdir(out)) == ["checkpoint-2", "metrics.jsonl"]
    os.makedirs(out / ".checkpoint-4.tmp")  # a save that crashed half way is never resumed from
    assert TR.latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    T.main(args + ["--resume"])
    assert_close(metrics(out), metrics(baseline[0]), rel=1e-6)  # steps 3..6 re-run from checkpoint-2
    assert os.listdir(out / "checkpoint-4") and not os.path.exists(out / "checkpoint-2")  # --keep 1
    assert os.path.isfile(out / "final" / "model.safetensors")


def test_final_checkpoint_loads_in_transformers(baseline, proc, train_data, images):
    from transformers import Qwen2VLForConditionalGeneration
    final = baseline[1]
    ours = CK.load(final)
    start = CK.load(os.path.join(baseline[0], "checkpoint-2"))
    assert not torch.equal(ours.lm_head.weight, start.lm_head.weight)  # trained past the checkpoint
    hf = Qwen2VLForConditionalGeneration.from_pretrained(final, dtype=torch.float32).eval()
    ds = D.ConversationDataset(train_data[0], D.Processor.from_pretrained(final), images, max_len=128)
    b = D.collate([ds[0], ds[1], ds[5]], proc.pad_id)
    ids, mask, pv, thw = b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"]
    with torch.no_grad():
        a = ours(ids, mask, pv, thw)
        mm = (ids == hf.config.image_token_id).int()
        pos, _ = hf.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=thw, attention_mask=mask)
        h = hf(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm,
               position_ids=pos).logits
    m = mask.bool()
    assert ((a - h)[m].abs().max() / h[m].abs().max()).item() < 1e-5
    with open(os.path.join(final, "preprocessor_config.json")) as f:
        assert json.load(f)["max_pixels"] == 28 * 28 * 64  # the pixel limits it was trained with


def test_overfit_eight_samples_and_pack_equals_unpacked(tiny_ckpt, train_data, images, tmp_path):
    args = ["--model", tiny_ckpt[0], "--data", train_data[1], "--image-root", images, "--max-steps", "40",
            "--global-batch", "8", "--micro-batch", "8", "--lr", "3e-3", "--weight-decay", "0", "--no-balance",
            "--workers", "0", "--max-len", "128", *PIXELS]
    T.main(args + ["--out", str(tmp_path / "packed"), "--pack"])
    packed = metrics(tmp_path / "packed")
    assert packed[-1]["loss"] < 0.05 and packed[0]["loss"] > 3
    T.main(args + ["--out", str(tmp_path / "plain"), "--stop-after", "8"])
    plain = metrics(tmp_path / "plain")
    assert_close(packed[:8], plain)
    assert all(a["tokens"] == b["tokens"] for a, b in zip(packed, plain))  # same real tokens, fewer rows


def test_nan_loss_stops_naming_the_step(tiny_ckpt, train_data, images, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = T.forward_logprobs

    def poisoned(model, batch, targets, chunk, **kw):
        calls["n"] += 1
        lp = real(model, batch, targets, chunk, **kw)
        return lp * float("nan") if calls["n"] == 5 else lp  # micro-batch 1 of step 3

    monkeypatch.setattr(T, "forward_logprobs", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite loss .*checkpoint-2"):
        T.main(base_args(tiny_ckpt[0], train_data[0], images, out, "--save-every", "1"))
    assert TR.latest_checkpoint(str(out)).endswith("checkpoint-2") and not os.path.exists(out / "final")
    assert [r["step"] for r in metrics(out)] == [1, 2]
