"""The synthetic remote-sensing world (`synth.py synth`) and the tiny checkpoint (`synth.py tiny`): determinism,
records that agree with the drawn pixels, and a checkpoint every loader (ours, transformers) reads alike."""
import collections
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import checkpoint as CK
import rewards
import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(n_pretrain=24, n_sft=40, questions_per_image=2, n_grpo=40, n_eval=24, n_pretrain_vg=12, n_sft_vg=10,
             n_grpo_vg=10)
SEED = 3


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "synth.py"), *map(str, args)], check=True,
                          capture_output=True, text=True, cwd=ROOT).stdout


def tree_hashes(folder):
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(base, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f] if path.endswith(".jsonl") else json.load(f)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world written through the command line."""
    out = tmp_path_factory.mktemp("synth") / "w"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()]
    assert "pretrain 24" in cli("synth", "--out", out, "--seed", SEED, *flags)
    return str(out)


# -- determinism and splits -------------------------------------------------------------------------------------
def test_same_seed_gives_identical_files_and_another_seed_other_files(world, tmp_path):
    synth.write_synth(str(tmp_path / "again"), SEED, **SIZES)  # in-process, against the CLI's run
    first = tree_hashes(world)
    assert len(first) > 100 and first == tree_hashes(tmp_path / "again")
    synth.write_synth(str(tmp_path / "other"), SEED + 1, **SIZES)
    other = tree_hashes(tmp_path / "other")
    assert first.keys() == other.keys()
    assert not {v for k, v in first.items() if k.endswith(".png")} & set(other.values())


def test_command_line_help():
    assert "python synth.py tiny" in cli("--help")
    assert "--n-pretrain" in cli("synth", "--help") and "--vocab-size" in cli("tiny", "--help")


def test_splits_share_no_image_and_no_seed(world):
    by_split = collections.defaultdict(set)
    for rel, h in tree_hashes(world).items():
        if rel.endswith(".png"):
            by_split[rel.split(os.sep)[1]].add(h)  # images/<split>/..., eval/<file>/...
    assert set(by_split) == {"pretrain", "sft", "grpo", *synth.ONE_OBJECT_SPLITS, *synth.EVAL_TASKS}
    splits = list(by_split.values())
    assert all(not (a & b) for i, a in enumerate(splits) for b in splits[i + 1:])
    seeds = [s * 1000 + i for s in range(5) for i in synth.SYNTH_SPLITS.values()]
    assert len(seeds) == len(set(seeds))


# -- records against the scene facts ----------------------------------------------------------------------------
def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def check_box_is_the_drawn_object(scene, obj):
    """Drawing the scene without `obj` changes exactly its box (plus the 3-px shadow of buildings and tanks)."""
    without = synth.SynthScene(**{**scene.__dict__, "objects": [o for o in scene.objects if o is not obj]})
    diff = np.any(np.asarray(synth.render_scene(scene)) != np.asarray(synth.render_scene(without)), -1)
    ys, xs = np.nonzero(diff)
    x1, y1, x2, y2 = obj.box
    assert (xs.min(), ys.min()) == (x1, y1)
    assert x2 <= xs.max() + 1 <= x2 + 3 and y2 <= ys.max() + 1 <= y2 + 3
    assert 0 <= x1 < x2 <= scene.w and 0 <= y1 < y2 <= scene.h


def facts_answer(scene, task, question):
    """The answer computed from the scene facts alone, for the tasks whose answer is a plain fact."""
    counts = collections.Counter(o.kind for o in scene.objects)
    kind = next((k for k in synth.OBJECT_KINDS if re.search(rf"\b{k}s?\b", question)), None)
    if task == "cls":
        return scene.cls
    if task == "rural_urban":
        return "urban" if scene.cls in synth.URBAN else "rural"
    if task == "count":
        return str(counts[kind])
    if task == "presence":
        return "yes" if counts[kind] else "no"
    if task == "comparison":
        a, b = re.search(r"more (.+?)s than (.+?)s in", question).groups()
        return "yes" if counts[a] > counts[b] else "no"
    return None


def check_task(scene, task, question, answer):
    if (want := facts_answer(scene, task, question)) is not None:
        assert answer == want, (task, question, answer, want)
    elif task == "vg":
        box = [int(v) for v in re.fullmatch(r"\[\[(\d+), (\d+), (\d+), (\d+)\]\]", answer).groups()]
        obj = next(o for o in scene.objects if synth.norm_box(scene, o.box) == box)
        assert question.endswith(f"Locate the {obj.colour} {obj.kind} in this image.")  # colour and kind, always
        assert sum((o.colour, o.kind) == (obj.colour, obj.kind) for o in scene.objects) == 1  # so it is the one
        assert np.allclose(box, np.array(obj.box) * 1000 / [scene.w, scene.h, scene.w, scene.h], atol=0.5)
        check_box_is_the_drawn_object(scene, obj)
    elif task == "mcq":
        assert answer in "ABCD" and len(answer) == 1
        assert rewards.closed_match(answer, answer, question) == 1.0
        if question.startswith("What kind of scene"):
            assert re.search(rf"^{answer}\. {scene.cls}$", question, re.M)


def test_training_records_match_the_drawn_scenes(world):
    pre, sft, cot = (load(os.path.join(world, f)) for f in ("pretrain.json", "sft.json", "cot.json"))
    grpo = load(os.path.join(world, "grpo.jsonl"))
    sft_by_image = collections.defaultdict(list)
    for r in sft:
        sft_by_image[r["image"]].append(r)
    assert len(pre) == SIZES["n_pretrain"] + SIZES["n_pretrain_vg"]
    assert len(grpo) == SIZES["n_grpo"] + SIZES["n_grpo_vg"]
    for split, n, k in (("pretrain", SIZES["n_pretrain"], 1), ("pretrain_vg", SIZES["n_pretrain_vg"], 1),
                        ("sft", SIZES["n_sft"], 2), ("sft_vg", SIZES["n_sft_vg"], 1), ("grpo", SIZES["n_grpo"], 1),
                        ("grpo_vg", SIZES["n_grpo_vg"], 1)):
        for i, (scene, tasks) in enumerate(synth.split_items(SEED, split, n, k)):
            img = f"images/{split}/{i:05d}.png"
            assert np.array_equal(pixels(os.path.join(world, img)), np.asarray(synth.render_scene(scene)))
            if split == "pretrain":
                assert pre[i]["image"] == img and pre[i]["conversations"][1]["value"] == synth.scene_caption(scene)
                assert f" {scene.cls} scene." in pre[i]["conversations"][1]["value"]
            elif split in synth.ONE_OBJECT_SPLITS:  # after each file's own records: one question, one object
                assert [t["task"] for t in tasks] == ["vg"] and sum(o.kind != "vehicle" for o in scene.objects) == 1
                if split == "grpo_vg":
                    r = grpo[SIZES["n_grpo"] + i]
                    assert r["image"] == img and r["answer_type"] == "box"
                    check_task(scene, "vg", r["question"], r["answer"])
                    continue
                r = pre[SIZES["n_pretrain"] + i] if split == "pretrain_vg" else sft[-SIZES["n_sft_vg"] + i]
                assert r["image"] == img and r["task"] == "vg"
                q = r["conversations"][0]["value"]
                assert q.startswith("<image>\n")
                check_task(scene, "vg", q[len("<image>\n"):], r["conversations"][1]["value"])
            elif split == "sft":
                recs = sft_by_image[img]
                assert [r["task"] for r in recs] == [t["task"] for t in tasks] and len(recs) == k
                for r in recs:
                    q = r["conversations"][0]["value"]
                    assert q.startswith("<image>\n")
                    check_task(scene, r["task"], q[len("<image>\n"):], r["conversations"][1]["value"])
            else:
                r = grpo[i]
                assert r["image"] == img and r["answer_type"] == {"vg": "box", "caption": "open"}.get(r["task"], "closed")
                check_task(scene, r["task"], r["question"], r["answer"])


def test_grounded_objects_fill_cells_of_the_grid():
    """Boxes a question refers to are whole CELL-px cells of a 4x4 grid (2x2 image tokens each), so the tiny model
    can resolve them; grid objects never overlap; vehicles (a few pixels) are counted but never grounded."""
    grid, referred = 0, 0
    for scene, tasks in synth.split_items(SEED, "sft", 200, 2):
        cells = [o for o in scene.objects if o.kind != "vehicle"]
        grid += len(cells)
        for o in cells:
            assert all(v % synth.CELL == 0 for v in o.box) and o.box[2] <= scene.w and o.box[3] <= scene.h, o
        for i, a in enumerate(cells):
            for b in cells[i + 1:]:
                gap_x = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
                gap_y = max(b.box[1] - a.box[3], a.box[1] - b.box[3])
                assert max(gap_x, gap_y) >= 0, (a, b)
        for t in tasks:
            if t["task"] == "vg":
                referred += 1
                assert "vehicle" not in t["q"]
                box = [int(v) for v in re.findall(r"\d+", t["answer"])]
                assert len(box) == 4 and all(v % (1000 * synth.CELL // scene.w) == 0 for v in box), t["answer"]
    assert grid > 400 and referred > 20  # enough of both to have checked something


def test_captions_place_every_grid_object():
    """Pre-training captions name each non-vehicle object with its colour and where it lies (the 3x3 position words
    of the multiple-choice questions), and count the vehicles; no boxes (P's boxes come from its grounding records)."""
    placed = 0
    words = "top left|top right|bottom left|bottom right|top|bottom|left|right|center"
    for scene, _ in synth.split_items(SEED, "pretrain", 100):
        caption = synth.scene_caption(scene)
        found = collections.Counter(re.findall(rf"\b({'|'.join(synth.COLOURS)})(?: [a-z]+)? at the ({words})\b",
                                               caption))
        want = collections.Counter((o.colour, synth._where(scene, o.box)) for o in scene.objects if o.kind != "vehicle")
        assert found == want and "[[" not in caption, caption
        vehicles = sum(o.kind == "vehicle" for o in scene.objects)
        assert (f" {vehicles} vehicle" in caption) == (vehicles > 0), caption
        placed += sum(want.values())
    assert placed > 100


def test_vhm_tags_and_unbalanced_tasks():
    counts = collections.Counter(t["task"] for _, ts in synth.split_items(0, "sft", 500, 2) for t in ts)
    assert set(counts) == set(synth.SFT_TASKS)
    assert max(counts.values()) >= 3 * min(counts.values())  # so replicating rare tasks (--balance) matters
    tags = {"cls": "{CLS} ", "presence": "{VQA} ", "count": "{VQA} ", "comparison": "{VQA} ", "rural_urban": "{VQA} ",
            "vg": "{VG} "}
    for _, ts in synth.split_items(0, "sft", 100, 2):
        for t in ts:
            assert t["question"].startswith(tags.get(t["task"], "")) and ("{" in t["question"]) == (t["task"] != "mcq")


def test_cot_repeats_sft_questions_with_reasoned_answers_in_format(world):
    sft, cot = load(os.path.join(world, "sft.json")), load(os.path.join(world, "cot.json"))
    assert [r["id"] for r in sft] == [r["id"] for r in cot] and len({r["id"] for r in sft}) == len(sft)
    for s, c in zip(sft, cot):
        assert (s["image"], s["task"], s["conversations"][0]) == (c["image"], c["task"], c["conversations"][0])
        a = c["conversations"][1]["value"]
        assert rewards.format_reward(a) == 1.0
        assert rewards.extract_answer(a) == s["conversations"][1]["value"]
        reasoning = re.fullmatch(r"<reasoning>(.+)</reasoning><answer>.+</answer>", a, re.S).group(1)
        if s["task"] == "count":  # the reasoning cites the fact the answer states
            assert f"{s['conversations'][1]['value']}." in reasoning


def test_grpo_answers_earn_full_accuracy_reward(world):
    grpo = load(os.path.join(world, "grpo.jsonl"))
    assert set(grpo[0]) >= {"image", "question", "answer", "answer_type"}
    kinds = collections.Counter(r["answer_type"] for r in grpo)
    assert kinds["closed"] + kinds["box"] >= 0.8 * len(grpo) and kinds["box"] > 0
    for r in grpo:
        assert os.path.isfile(os.path.join(world, r["image"]))
        completion = f"<reasoning>...</reasoning><answer>{r['answer']}</answer>"
        assert rewards.accuracy_reward(completion, r["answer"], r["answer_type"], r["question"]) == 1.0


def test_eval_files_follow_the_rsrm_layout_with_pixel_boxes(world):
    for name in synth.EVAL_TASKS:
        recs = load(os.path.join(world, "eval", name + ".json"))
        assert len(recs) == SIZES["n_eval"]
        for (scene, (t,)), r in zip(synth.split_items(SEED, name, len(recs)), recs):
            path = os.path.join(world, "eval", name, r["image"])
            with Image.open(path) as im:
                assert list(im.size) == r["size"] == [scene.w, scene.h]
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt" and human["value"] == "<image>\n" + t["q"]
            # bare as in the benchmarks; the evaluator's wrapping gives back the training prompt
            assert data.TASK_PROMPTS[synth.EVAL_TASKS[name][0]].replace("{q}", t["q"]) == t["question"]
            assert r["type"] == [t.get("mcq_type", t["task"])]
            if name == "vg_synth":
                (box,) = rewards.parse_boxes(gpt["value"])
                assert box == list(t["box_px"]) and 0 <= box[0] < box[2] <= r["size"][0] and box[3] <= r["size"][1]
            else:
                check_task(scene, t["task"], t["question"], gpt["value"])
    mcq_types = {r["type"][0] for r in load(os.path.join(world, "eval", "mcq_synth.json"))}
    assert len(mcq_types) >= 3


# -- the tiny checkpoint ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert "parameters" in cli("tiny", "--out", out)
    return str(out)


def test_tiny_is_deterministic(tiny, tmp_path):
    synth.write_tiny(str(tmp_path / "again"), seed=0)
    first = tree_hashes(tiny)
    assert set(first) >= {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                          "tokenizer_config.json", "preprocessor_config.json", "example.png"}
    assert first == tree_hashes(tmp_path / "again")
    synth.write_tiny(str(tmp_path / "other"), seed=1)
    assert tree_hashes(tmp_path / "other")["model.safetensors"] != first["model.safetensors"]


def test_tiny_weights_config_and_tokenizer(tiny):
    ours = CK.load(tiny)
    n = sum(p.numel() for p in ours.parameters())
    assert 1e6 < n < 10e6
    for name, p in ours.named_parameters():
        if name.endswith("bias"):
            assert not p.any()
        elif p.ndim == 1:
            assert torch.all(p == 1)
        else:
            assert abs(p.std().item() - 0.02) < 0.004 and abs(p.mean().item()) < 0.002, name
    proc = data.Processor.from_pretrained(tiny)
    tok, cfg = proc.tokenizer, ours.config
    learned = tok.get_vocab_size() - len(synth.SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in synth.SPECIAL_TOKENS] == list(range(learned, tok.get_vocab_size()))
    assert cfg.vocab_size >= tok.get_vocab_size() and cfg.tie_word_embeddings
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.eos_token_id, cfg.pad_token_id) \
        == (proc.image_token_id, proc.vision_start_id, proc.vision_end_id, [proc.im_end_id], proc.pad_id)
    texts = synth.synth_texts(0)
    assert all(proc.decode(tok.encode(t, add_special_tokens=False).ids, skip_special_tokens=False) == t for t in texts)
    # templated text compresses well: whole words, not bytes
    assert sum(len(tok.encode(t).ids) for t in texts) < 0.35 * sum(len(t) for t in texts)
    ip = proc.image_processor
    assert (ip.min_pixels, ip.max_pixels) == (56 * 56, 28 * 28 * 64)
    with Image.open(os.path.join(tiny, "example.png")) as im:
        assert ip.target_size(im.height, im.width) == (im.height, im.width)  # seen whole, not resized
    with open(os.path.join(tiny, "tokenizer_config.json")) as f:
        assert json.load(f) == data.tokenizer_config(synth.QWEN2VL_CHAT_TEMPLATE)


def test_grounding_boxes_start_at_fixed_distances_from_the_image(tiny):
    """The tiny model reads where an object is through rotary angles relative to the token it is writing, so the
    world holds that distance fixed: every grounding question (SFT, evaluation, one-object) is the same number of
    tokens, and a reasoned answer (C, R) writes the box's first digit exactly one token later than a plain answer
    (P, S) does."""
    tok = data.Processor.from_pretrained(tiny).tokenizer
    q_lengths, first_digit, n = set(), collections.defaultdict(set), 0
    for split in ("sft", "vg_synth", *synth.ONE_OBJECT_SPLITS):
        for _, tasks in synth.split_items(0, split, 100, 2):
            for t in (t for t in tasks if t["task"] == "vg"):
                n += 1
                q_lengths.add(len(tok.encode(t["question"], add_special_tokens=False).ids))
                for kind, answer in (("plain", t["answer"]), ("reasoned", synth.cot_answer(t))):
                    tokens = tok.encode(answer, add_special_tokens=False).tokens
                    first_digit[kind].add(next(i for i, x in enumerate(tokens) if x.isdigit()))
    assert n > 300 and len(q_lengths) == 1
    assert first_digit == {"plain": {1}, "reasoned": {2}}


def test_tiny_loads_in_transformers_with_equal_logits(tiny):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    ours, proc = CK.load(tiny), data.Processor.from_pretrained(tiny)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many ships are in this image?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    hf_tok = AutoTokenizer.from_pretrained(tiny)
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == text
    b = proc([text], images=[os.path.join(tiny, "example.png")])
    ids, pv, thw = b["input_ids"], b["pixel_values"], b["image_grid_thw"]
    mm = (ids == hf.config.image_token_id).int()
    with torch.no_grad():
        pos, _ = hf.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=thw)
        want = hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm, position_ids=pos).logits
        got = ours(ids, None, pv, thw)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_demo_command_answers_about_the_example_image(tiny, capsys):
    """`python ask.py` on the tiny model and its example image prints what the same call answers in-process."""
    import ask
    argv = ["--model", tiny, "--image", os.path.join(tiny, "example.png"), "--max-new-tokens", "4",
            "How many ships are in this image?"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "ask.py"), *argv], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout
    want = ask.main(argv)
    assert out == want + "\n" and capsys.readouterr().out == out
