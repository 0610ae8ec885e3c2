"""evaluate.py: metrics on handcrafted outputs, zoom geometry, and end-to-end runs of a tiny random model
(one process, two processes under torchrun, interrupted and resumed)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402
from data import TASK_PROMPTS, ImageProcessor, Processor  # noqa: E402

THINK = "<reasoning>The roofs are dense and regular.</reasoning><answer>{}</answer>"


# --- text accuracy: strict vs the public lenient rule --------------------------------------------------

@pytest.mark.parametrize("task_type, pred, answer, strict, lenient", [
    ("vqa", "", "yes", 0, 1),                                  # empty: lenient counts it correct
    ("vqa", "Yes, there are two.", "yes", 1, 1),
    ("vqa", "no", "yes", 0, 0),
    ("cls", "resident", "residential", 0, 1),                  # substring passes leniently only
    ("cls", "Dense Residential.", "dense_residential", 1, 0),  # strict reads "_" as a space; public does not
    ("cls", "dense residential", "dense residential", 1, 1),
    ("cls", "Forest.", "forest", 1, 1),
    ("cls", THINK.format("forest"), "forest", 1, 1),           # reasoning tags: the <answer> is graded
    ("cls", THINK.format(""), "forest", 0, 1),                 # empty answer inside tags
    ("cls", "<reasoning>a forest, or maybe a park", "forest", 0, 0),  # truncated chain of thought
    ("vqa", "<reasoning>x</reasoning> rural", "rural", 1, 1),
    ("mcq", "B", "B", 1, 1),
    ("mcq", "B. forest", "B", 1, 1),
    ("mcq", "", "C", 0, 1),
    ("mcq", "A", "C", 0, 0),
])
def test_text_scores(task_type, pred, answer, strict, lenient):
    s = E.score_record(task_type, pred, answer, "Which? A. farmland B. forest C. river")
    assert (s["strict"], s["lenient"]) == (strict, lenient)
    assert s["score"] == s["strict"]


def test_mcq_option_text_matches_letter_and_per_type_accuracy():
    q = "What is shown? A. farmland B. forest C. river"
    lines = [{"pred": "forest", "answer": "B", "question": q, "type": ["1", "5"]},
             {"pred": "C", "answer": "C", "question": q, "type": ["5"]},
             {"pred": "", "answer": "A", "question": q, "type": ["1"]},
             {"pred": "A", "answer": "B", "question": q, "type": "custom kind"}]  # a bare type
    m = E.summarize("mcq", lines)
    assert m["acc_strict"] == 0.5 and m["n"] == 4 and m["n_empty"] == 1
    assert m["acc_lenient"] == 0.5  # "forest" is not in "b" leniently, but "" is in "a"
    assert m["by_type"]["identity"] == {"n": 2, "acc_strict": 0.5, "acc_lenient": 0.5}
    assert m["by_type"]["quantity"] == {"n": 2, "acc_strict": 1.0, "acc_lenient": 0.5}
    assert m["by_type"]["custom kind"]["acc_strict"] == 0.0


# --- grounding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred", [
    "[[100, 100, 600, 600]]", "[100,100,600,600]", "<|box_start|>(100,100),(600,600)<|box_end|>",
    "(100, 100), (600, 600)", THINK.format("[[100, 100, 600, 600]]"), "[[600, 600, 100, 100]]"])
def test_box_forms_scaled_by_image_size(pred):
    # 200 x 100 image (not square: swapped axes would show); 0..1000 -> pixels
    s = E.score_record("bbox", pred, "[20, 10, 120, 60]", size=[200, 100])
    assert s["parsed"] == [[20.0, 10.0, 120.0, 60.0]]
    assert s["iou"] == [pytest.approx(1.0)] and s["level"] == ["M"]


def test_boxes_outside_the_image_are_clamped_and_pixel_gt_may_pass_1000():
    s = E.score_record("bbox", "[[900, 900, 1300, 1250]]", "[90, 90, 100, 100]", size=[100, 100])
    assert s["parsed"] == [[90.0, 90.0, 100.0, 100.0]] and s["iou"][0] == pytest.approx(1.0)
    s = E.score_record("bbox", "[[-50, -50, 0, 0]]", "[0, 0, 10, 10]", size=[100, 100])
    assert s["iou"] == [0.0]
    # DIOR-RSVG is 800 px, but pixel ground truth of bigger images goes past 1000: it must not be clamped
    s = E.score_record("bbox", "[[375, 500, 625, 750]]", "[1500, 2000, 2500, 3000]", size=[4000, 4000])
    assert s["iou"][0] == pytest.approx(1.0)
    assert E.pixel_boxes([[1500, 2000, 2500, 3000]]) == [[1500, 2000, 2500, 3000]]


def test_grounding_metrics_levels_and_missing_boxes():
    size = [1000, 1000]  # 0..1000 equals pixels
    lines = [{"pred": "[[0, 0, 31, 31]]", "answer": "[0, 0, 31, 31]", "size": size},         # S hit
             {"pred": "[[500, 500, 531, 531]]", "answer": "[0, 0, 31, 31]", "size": size},   # S miss
             {"pred": "[[0, 0, 32, 32]]", "answer": "[0, 0, 32, 32]", "size": size},         # 32^2: M
             {"pred": "no idea", "answer": "[0, 0, 95, 95]", "size": size},                  # M, no box
             {"pred": "[[0, 0, 96, 60]]", "answer": "[0, 0, 96, 96]", "size": size},         # L, IoU 0.625
             {"pred": "[[0, 0, 96, 40]]", "answer": "[0, 0, 96, 96]", "size": size}]         # L, IoU ~0.42
    m = E.summarize("bbox", lines)
    assert (m["n_S"], m["n_M"], m["n_L"]) == (2, 2, 2) and m["n_no_box"] == 1
    assert m["pr@0.5"] == pytest.approx(3 / 6)
    assert (m["pr@0.5_S"], m["pr@0.5_M"], m["pr@0.5_L"]) == (0.5, 0.5, 0.5)
    assert m["mean_iou"] == pytest.approx((1 + 0 + 1 + 0 + 0.625 + 40 / 96) / 6)
    assert m["score"] == m["pr@0.5"]
    # public: the record without a box leaves the denominator: 3 hits of 5 counted boxes
    assert (m["pr@0.5_public"], m["n_boxes_public"]) == (pytest.approx(3 / 5), 5)
    assert m["score_lenient"] == m["pr@0.5_public"]


def test_grounding_strict_vs_public_figures():
    size = [1000, 1000]  # 0..1000 equals pixels
    gt = "[0, 0, 100, 100]"
    lines = [{"pred": "[[0, 0, 100, 100]]", "answer": gt, "size": size},                 # hit, both
             {"pred": "[[500, 500, 600, 600]]", "answer": gt, "size": size},             # miss, both
             {"pred": "no box here", "answer": gt, "size": size},                        # strict miss, public drop
             {"pred": "[0, 0, 100, 100]", "answer": gt, "size": size},                   # single brackets: strict
             # hit; the public [[...]] pattern does not parse it, so public drops the record
             {"pred": "[[0, 0, 100, 100]]", "answer": "[[0, 0, 100, 100], [200, 200, 300, 300]]",
              "size": size},                                                             # strict hit + miss;
             # public zips 1 predicted box with 2 ground-truth boxes: 1 pair, a hit
             {"pred": "[[100, 100, 600, 600]]", "answer": "[20, 10, 120, 60]", "size": [200, 100]},  # (w, h):
             # a hit in both when scaled by [w, h]
             {"pred": "[[900, 900, 1300, 1250]]", "answer": "[90, 90, 100, 100]", "size": [100, 100]},
             # strict clamps to the image: IoU 1; public does not: 10*10 / (40*35), a miss
             {"pred": "<reasoning>[[0, 0, 100, 100]]</reasoning><answer>[[500, 500, 600, 600]]</answer>",
              "answer": gt, "size": size}]                                               # the <answer> box: miss
    m = E.summarize("bbox", lines)
    # strict: 9 ground-truth boxes, hits in rows 1, 4, 5 (first box), 6, 7
    assert (m["n_boxes"], m["pr@0.5"]) == (9, pytest.approx(5 / 9)) and m["n_no_box"] == 1
    # public: pairs from rows 1, 2, 5, 6, 7, 8; hits in rows 1, 5, 6
    assert (m["n_boxes_public"], m["pr@0.5_public"]) == (6, pytest.approx(3 / 6))
    assert (m["score"], m["score_lenient"]) == (m["pr@0.5"], m["pr@0.5_public"])
    s = E.score_record("bbox", lines[6]["pred"], lines[6]["answer"], size=lines[6]["size"])
    assert s["iou"] == [pytest.approx(1.0)] and s["iou_public"] == [pytest.approx(100 / 1400)]
    assert "| Grounding | G | 55.6 / 50.0 |" in E.table({"r": {"tasks": {"G": {"group": "grounding", **m}}}})


def test_several_ground_truth_boxes_pair_in_order():
    s = E.score_record("bbox", "[[0,0,10,10]] [[50,50,60,60]]", "[[0,0,10,10],[50,50,60,60],[80,80,90,90]]",
                       size=[1000, 1000])
    assert s["iou"] == [pytest.approx(1.0), pytest.approx(1.0), 0.0]


def test_zoom_crop_maps_back_to_full_image():
    # the model answered on the crop [1000, 2000, 1500, 2500] of a 4000 x 3000 image
    s = E.score_record("bbox", "[[0, 0, 500, 1000]]", "[1000, 2000, 1250, 2500]", size=[4000, 3000],
                       crop=[1000, 2000, 1500, 2500])
    assert s["parsed"] == [[1000.0, 2000.0, 1250.0, 2500.0]] and s["iou"][0] == pytest.approx(1.0)


# --- zoom-in chain geometry --------------------------------------------------------------------------

def test_zoom_crop_geometry():
    # a 100 x 80 px box at (5000, 3000) of an 8000 x 6000 image, as 0..1000 of the downscaled view
    box = [5000 / 8, 3000 / 6, 5100 / 8, 3080 / 6]
    assert E.zoom_crop(box, (8000, 6000), min_side=0, margin=0.0) == [5000, 3000, 5100, 3080]
    assert E.zoom_crop(box, (8000, 6000), min_side=0, margin=0.5) == [4950, 2960, 5150, 3120]
    c = E.zoom_crop(box, (8000, 6000), min_side=1000, margin=0.25)
    assert (c[2] - c[0], c[3] - c[1]) == (1000, 1000) and c[0] < 5000 and c[2] > 5100
    assert abs((c[0] + c[2]) / 2 - 5050) <= 1 and abs((c[1] + c[3]) / 2 - 3040) <= 1  # centred
    # near a corner: shifted inside, not shrunk
    assert E.zoom_crop([0, 0, 5, 5], (8000, 6000), min_side=1000) == [0, 0, 1000, 1000]
    assert E.zoom_crop([995, 990, 1000, 1000], (8000, 6000), min_side=1000) == [7000, 5000, 8000, 6000]
    # bigger than the image on one axis: the whole axis
    assert E.zoom_crop([0, 400, 1000, 600], (8000, 600), min_side=1000, margin=0) == [0, 0, 8000, 600]
    # a degenerate box still gives a crop of at least one merged patch
    c = E.zoom_crop([500, 500, 500, 500], (8000, 6000), min_side=0)
    assert c[2] - c[0] >= 28 and c[3] - c[1] >= 28


def test_zoom_puts_more_pixels_on_a_small_target_of_an_ultra_high_resolution_image():
    ip = ImageProcessor()  # Qwen2-VL's default budget, 1280 merged tokens
    W, H, target = 12000, 9000, [7000, 4000, 7060, 4045]   # a 60 x 45 px object
    def pixels_on_target(region):  # target pixels after the processor resizes `region` for the model
        th, tw = ip.target_size(region[3] - region[1], region[2] - region[0])
        return (target[2] - target[0]) * tw / (region[2] - region[0]) * (target[3] - target[1]) * th / (
            region[3] - region[1])
    first = pixels_on_target([0, 0, W, H])
    box = [1000 * target[0] / W, 1000 * target[1] / H, 1000 * target[2] / W, 1000 * target[3] / H]
    crop = E.zoom_crop(box, (W, H), int(math.sqrt(ip.max_pixels)))
    assert crop[0] <= target[0] and crop[1] <= target[1] and crop[2] >= target[2] and crop[3] >= target[3]
    second = pixels_on_target(crop)
    assert first < 30 and second > 50 * first  # a ~2-pixel smudge becomes the object at ~native resolution
    assert second == pytest.approx(60 * 45, rel=0.1)


def test_zoom_chain_asks_for_a_region_then_answers_on_the_full_resolution_crop(tiny_ckpt, tmp_path, monkeypatch):
    proc = Processor.from_pretrained(tiny_ckpt[0])  # pixel budget 224 x 224
    _image(tmp_path / "big.png", 280, 224, 0)
    seen = []

    def fake_generate(run, texts, images):
        seen.append([im.size for im in images])
        first_pass = "needed to answer" in texts[0]
        return ["[[0, 0, 500, 500]]" if first_pass else "[[0, 0, 1000, 1000]]"] * len(texts), [3] * len(texts)

    monkeypatch.setattr(E, "generate", fake_generate)
    rec = E.Record(0, str(tmp_path / "big.png"), "the bridge", "[0, 0, 200, 150]")
    line, = E.run_batch(E.Run(None, proc, zoom=True), "bbox", [rec])
    assert seen == [[(280, 224)], [(224, 224)]]  # pass 1 on the whole image, pass 2 on the crop
    assert line["crop"] == [0, 0, 224, 224] and line["new_tokens"] == 6 and line["zoom_pred"] == "[[0, 0, 500, 500]]"
    assert line["parsed"] == [[0.0, 0.0, 224.0, 224.0]] and line["iou"][0] == pytest.approx(30000 / 224 ** 2)
    unzoomed = E.score_record("bbox", "[[0, 0, 1000, 1000]]", rec.answer, size=[280, 224])["iou"][0]
    assert line["iou"][0] > 0.5 > unzoomed  # the same answer on the whole image would miss
    seen.clear()
    small = E.Record(1, str(tmp_path / "small.png"), "q", "[0, 0, 5, 5]")
    _image(small.image, 56, 56, 1)
    line, = E.run_batch(E.Run(None, proc, zoom=True), "bbox", [small])
    assert seen == [[(56, 56)]] and "crop" not in line  # within the budget: one pass


# --- files, prompts, errors --------------------------------------------------------------------------

def test_load_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        E.load_records(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "human", "value": "q"},
                                                                     {"from": "gpt", "value": "a"}]},
                               {"image": "b.png", "conversations": [{"from": "human", "value": "q"}]}]))
    with pytest.raises(ValueError, match="record 1 has no human or no gpt turn"):
        E.load_records(bad)


def test_task_selection_and_its_errors(bench, tmp_path):
    def jobs(*argv):
        return E.task_list(E.parse_args(["--model", "m", "--out", str(tmp_path), *argv]))
    got = jobs("--data-root", str(bench), "--tasks", "AID,LHRS-Bench", "--task-file", str(bench / "one.json"),
               "--task-file", str(bench / "cls_AID.json"), "--task-type", "vqa")
    assert [(n, t, g) for n, _, t, g in got] == [("AID", "cls", "classification"), ("LHRS-Bench", "mcq", "knowledge"),
                                                 ("one", "vqa", "custom"), ("cls_AID", "vqa", "custom")]
    assert [j[0] for j in jobs("--task-file", str(bench / "one.json"), "--task-type", "vqa")] == ["one"]
    with pytest.raises(SystemExit, match="cls_METER_ML.json"):  # all 12 asked, most missing: named
        jobs("--data-root", str(bench), "--tasks", "all")
    with pytest.raises(SystemExit, match="unknown task"):
        jobs("--data-root", str(bench), "--tasks", "AID,Nope")
    with pytest.raises(SystemExit):
        jobs("--task-file", "a.json", "--task-file", "b.json", "--task-type", "cls", "--task-type", "vqa",
             "--task-type", "mcq")


def test_prompts_per_mode(tiny_ckpt):
    proc = Processor.from_pretrained(tiny_ckpt[0])
    plain = E.build_prompt(proc, "Is there a ship?", "vqa", "plain")
    assert "{VQA} Is there a ship?" in plain and "You are a helpful assistant." in plain
    think = E.build_prompt(proc, "the red car", "bbox", "think")
    assert "{VG} the red car" in think and "<reasoning> </reasoning>" in think and "helpful" not in think
    qwen = E.build_prompt(proc, "the red car", "bbox", "qwen")
    assert "<|object_ref_start|>the red car<|object_ref_end|>" in qwen and "{VG}" not in qwen
    assert qwen.count("<|image_pad|>") == 1 and qwen.endswith("<|im_start|>assistant\n")


USER = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
R1_SYSTEM = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
             "The assistant first thinks about the reasoning process in the mind and then provides the user with "
             "the answer. The reasoning process and answer are enclosed within <reasoning> </reasoning> and "
             "<answer> </answer> tags, respectively, i.e., <reasoning> reasoning process here </reasoning>"
             "<answer> answer here </answer>")  # eval/config/qwen2_thinking_template.json of the public code


@pytest.mark.parametrize("task_type, question, user_text", [
    ("cls", "Classify the scene.", "{CLS} Classify the scene."),
    ("vqa", "Is there a ship?", "{VQA} Is there a ship? "),        # " " + the empty suffix
    ("bbox", "the red car", "{VG} the red car "),
    ("mcq", "What is it? A. port B. farm", "What is it? A. port B. farm"),  # LHRS-Bench: the bare question
])
def test_public_prompts_are_the_public_scripts_text(tiny_ckpt, task_type, question, user_text):
    proc = Processor.from_pretrained(tiny_ckpt[0])
    plain = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + USER + user_text + ASSISTANT
    assert E.build_prompt(proc, question, task_type, "plain") == plain  # public is the default
    assert E.build_prompt(proc, question, task_type, "plain", "public") == plain
    think = f"<|im_start|>system\n{R1_SYSTEM}<|im_end|>\n" + USER + user_text + ASSISTANT
    assert E.build_prompt(proc, question, task_type, "think", "public") == think
    ours = E.build_prompt(proc, question, task_type, "plain", "ours")
    assert ours == plain.replace(user_text, TASK_PROMPTS[task_type].replace("{q}", question)) != plain
    with pytest.raises(ValueError, match="unknown prompt style 'mine'"):
        E.build_prompt(proc, question, task_type, "plain", "mine")


def test_load_records_reads_a_conversation_key(tmp_path):
    f = tmp_path / "lhrs.json"
    f.write_text(json.dumps([{"image": "a.png", "type": ["2"],
                              "conversation": _conv("Which colour? A. red B. blue", "B")}]))
    rec, = E.load_records(f)
    assert (rec.question, rec.answer, rec.types) == ("Which colour? A. red B. blue", "B", ["2"])
    assert rec.image == str(tmp_path / "lhrs" / "a.png") and rec.source == str(f)


def test_score_reads_public_output_rows_with_query(tmp_path, capsys):
    """Rows as the public script writes them (query, filename, size, answer, pred, type); "B" and "forest" match
    only through the query's "B. forest"."""
    q = "What is shown? A. farmland B. forest C. city D. lake"
    rows = [("B", "forest", ["1"]),                                        # right via the query
            ("C. city", "city", ["1"]),                                    # right: same text
            ("A", "A", ["5"]),                                             # right: same letter
            ("forest", "B", ["5"]),                                        # right via the query
            ("<reasoning>blue water</reasoning><answer>D</answer>", "lake", ["2"]),  # right via the query
            ("A", "forest", ["2"]),                                        # wrong
            ("", "C", ["1"])]                                              # wrong: empty
    f = tmp_path / "LHRS-Bench_TinyRS-R1_eval.jsonl"
    f.write_text("\n".join(json.dumps({"filename": f"/data/LHRS-Bench/{i}.png", "size": [512, 512], "query": q,
                                       "answer": a, "type": t, "pred": p}) for i, (p, a, t) in enumerate(rows)))
    assert E.main(["score", "--task-type", "mcq", str(f)]) == 0
    m = json.loads(capsys.readouterr().out)
    assert (m["n"], m["acc_strict"]) == (7, pytest.approx(5 / 7))
    assert m["acc_lenient"] == pytest.approx(3 / 7)  # "c" in "city", "a" in "a", "" in "c"
    assert m["by_type"]["color"]["acc_strict"] == 0.5
    # without the question the letters cannot map to options: only rows 2 and 3 match
    f.write_text("\n".join(json.dumps({"answer": a, "pred": p}) for p, a, _ in rows))
    E.main(["score", "--task-type", "mcq", str(f)])
    assert json.loads(capsys.readouterr().out)["acc_strict"] == pytest.approx(2 / 7)


def test_score_command_and_its_errors(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    lines = [{"pred": "[[0,0,500,500]]", "answer": "[0, 0, 50, 100]", "size": [100, 200]},
             {"pred": "", "answer": "[0, 0, 10, 10]", "size": [100, 200]}]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert E.main(["score", "--task-type", "bbox", str(f)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == E.summarize("bbox", lines) and out["pr@0.5"] == 0.5
    f.write_text(json.dumps({"pred": "x", "answer": "[0,0,1,1]"}) + "\n")
    with pytest.raises(SystemExit, match="line 1: needs pred, answer, size"):
        E.main(["score", "--task-type", "bbox", str(f)])
    f.write_text(json.dumps({"pred": "x", "answer": "no box", "size": [9, 9], "filename": "/d/img7.png"}) + "\n")
    with pytest.raises(SystemExit, match=r"line 1 \(img7.png\): ground truth 'no box' has no \[x1"):
        E.main(["score", "--task-type", "bbox", str(f)])


# --- end to end --------------------------------------------------------------------------------------

def _image(path, w, h, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _conv(q, a):
    return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small benchmark in the RSRM layout: four named tasks (all four kinds) and a one-record custom file."""
    root = tmp_path_factory.mktemp("bench")
    files = {
        "cls_AID": [("Classify the scene: forest, river, airport.", "forest", 56, 56),
                    ("Classify the scene: forest, river, airport.", "river", 84, 56),
                    ("Classify the scene: forest, river, airport.", "airport", 320, 240)],  # over budget: zoom
        "RSVQA_LR-presence_RSVQA": [("Is there a road?", "yes", 56, 56), ("Is there water?", "no", 56, 84),
                                    ("Are there buildings?", "yes", 112, 56)],
        "VG_DOIR_RSVG_test": [("the small ship", "[4, 6, 20, 30]", 56, 56),
                              ("the large tank", "[10, 10, 100, 50]", 112, 56),
                              ("the bridge", "[0, 0, 200, 150]", 280, 224)],
        "LHRS-Bench": [("What is it? A. port B. farm C. city", "B", 56, 56, ["1", "5"]),
                       ("How many? A. one B. two C. three", "A", 56, 56, ["5"]),
                       ("Which colour? A. red B. blue", "B", 84, 56, ["2"])],
        "one": [("Is it urban?", "yes", 56, 56)],
        "bad": [("Is it urban?", "yes", 56, 56), ("Is it rural?", "no", 56, 56),     # 1: truncated below
                ("Is it wet?", "no", 56, 56), ("Is it dry?", "yes", 84, 56)],        # 2: deleted below
    }
    for stem, recs in files.items():
        (root / stem).mkdir()
        items = []
        for i, (q, a, w, h, *types) in enumerate(recs):
            name = f"{stem}_{i}.png"
            item = {"image": name, "conversations": _conv(q, a), "size": [w, h]}
            if stem == "RSVQA_LR-presence_RSVQA" and i == 1:  # an image elsewhere, named by image_path
                (root / "elsewhere").mkdir(exist_ok=True)
                _image(root / "elsewhere" / name, w, h, i)
                item["image_path"] = "elsewhere"
            else:
                _image(root / stem / name, w, h, i + 10 * len(items))
            if types:
                item["type"] = types[0]
            items.append(item)
        (root / f"{stem}.json").write_text(json.dumps(items))
    png = (root / "bad" / "bad_1.png").read_bytes()
    (root / "bad" / "bad_1.png").write_bytes(png[:len(png) // 2])  # its header reads, its pixels do not
    (root / "bad" / "bad_2.png").unlink()
    return root


NAMED = "AID,LR-presence,DIOR-RSVG,LHRS-Bench"
TIMING = ("seconds", "peak_mem_gb", "sec_per_sample", "tokens_per_sec")


def _records(out, name):
    lines = (Path(out) / f"{name}.jsonl").read_text().splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMING}
    return x


def test_end_to_end_metrics_equal_rescoring_of_jsonl(tiny_ckpt, bench, tmp_path, capsys):
    out = tmp_path / "out"
    assert E.main(["--model", tiny_ckpt[0], "--data-root", str(bench), "--tasks", NAMED, "--out", str(out),
                   "--batch-size", "2", "--max-new-tokens", "6", "--zoom"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["tasks"]) == NAMED.split(",")
    for name, task in metrics["tasks"].items():
        meta, recs = _records(out, name)
        assert meta["meta"]["mode"] == "plain" and meta["meta"]["task_type"] == task["type"]
        assert meta["meta"]["prompts"] == "public" and task["n_skipped"] == 0
        assert [r["index"] for r in recs] == [0, 1, 2]
        for r in recs:
            assert {"index", "id", "question", "answer", "prompt", "pred", "parsed", "score", "seconds"} <= set(r)
        capsys.readouterr()
        E.main(["score", "--task-type", task["type"], str(out / f"{name}.jsonl")])
        rescored = json.loads(capsys.readouterr().out)
        assert rescored == {k: v for k, v in task.items() if k not in ("group", "type", "n_skipped")}
        assert task["n"] == 3 and task["sec_per_sample"] > 0 and task["peak_mem_gb"] > 0
    aid = _records(out, "AID")[1]
    assert "zoom_pred" in aid[2] and "zoom_pred" not in aid[0]  # only the image over the pixel budget
    # the exact chat text sent, per record and for the zoom pass
    q = "Classify the scene: forest, river, airport."
    assert aid[0]["prompt"].endswith(f"<|vision_end|>{{CLS}} {q}<|im_end|>\n<|im_start|>assistant\n")
    assert aid[2]["zoom_prompt"].endswith(f'<|vision_end|>{{VG}} the part of the image needed to answer "{q}" '
                                          '<|im_end|>\n<|im_start|>assistant\n') and "zoom_prompt" not in aid[0]
    assert _records(out, "LR-presence")[1][0]["prompt"].endswith("{VQA} Is there a road? <|im_end|>\n"
                                                                 "<|im_start|>assistant\n")
    assert _records(out, "LHRS-Bench")[1][1]["prompt"].endswith("<|vision_end|>How many? A. one B. two C. three"
                                                                "<|im_end|>\n<|im_start|>assistant\n")
    assert metrics["tasks"]["DIOR-RSVG"]["score_lenient"] == metrics["tasks"]["DIOR-RSVG"]["pr@0.5_public"]
    assert _records(out, "LR-presence")[1][1]["id"] == "RSVQA_LR-presence_RSVQA_1.png"
    assert _records(out, "LHRS-Bench")[1][0]["type"] == ["1", "5"]
    assert set(metrics["tasks"]["LHRS-Bench"]["by_type"]) == {"identity", "quantity", "color"}
    assert metrics["groups"]["vqa"]["score"] == metrics["tasks"]["LR-presence"]["score"]
    md = (out / "results.md").read_text()
    assert "| Classification | AID |" in md and md.count("| | Average |") == 4
    assert E.main(["compare", str(out), str(out)]) == 0
    assert capsys.readouterr().out.count("| LHRS-Bench |") == 1


def test_interrupted_run_resumes_and_foreign_files_are_refused(tiny_ckpt, bench, tmp_path, monkeypatch):
    out, calls = tmp_path / "out", []
    real = E.generate

    def counting(run, texts, images):
        calls.append(len(texts))
        if len(calls) == 2 and fail[0]:
            raise KeyboardInterrupt  # killed after the first batch was written
        return real(run, texts, images)

    monkeypatch.setattr(E, "generate", counting)
    args = ["--model", tiny_ckpt[0], "--data-root", str(bench), "--tasks", "LR-presence", "--out", str(out),
            "--batch-size", "1", "--max-new-tokens", "4"]
    fail = [True]
    with pytest.raises(KeyboardInterrupt):
        E.main(args)
    first = _records(out, "LR-presence")[1]
    assert [r["index"] for r in first] == [2] and sum(calls) == 2  # longest prompt first; its line survived
    with open(out / "LR-presence.jsonl", "a") as f:
        f.write('{"index": 1, "pred": "cut sho')  # a line cut short by the kill
    fail[0], calls[:] = False, []
    assert E.main(args + ["--limit", "2"]) == 0
    assert sum(calls) == 2  # records 0 and 1
    calls[:] = []
    assert E.main(args) == 0
    assert sum(calls) == 0  # all three done: nothing redone
    recs = _records(out, "LR-presence")[1]
    assert [r["index"] for r in recs] == [0, 1, 2] and recs[2] == first[0]
    assert json.loads((out / "metrics.json").read_text())["tasks"]["LR-presence"]["n"] == 3
    # the same output folder for another mode: refused with a clear message, redone with --overwrite
    with pytest.raises(SystemExit, match=r"different run \(mode differ\).*--overwrite"):
        E.main(args + ["--mode", "think"])
    with pytest.raises(SystemExit, match=r"different run \(prompts differ\)"):  # same mode, other wording
        E.main(args + ["--prompts", "ours"])
    calls[:] = []
    assert E.main(args + ["--mode", "think", "--overwrite"]) == 0
    assert sum(calls) == 3 and _records(out, "LR-presence")[0]["meta"]["mode"] == "think"


def _bad_args(ckpt, bench, out):
    return ["--model", ckpt, "--task-file", str(bench / "bad.json"), "--task-type", "vqa", "--out", str(out),
            "--max-new-tokens", "2"]


def test_a_bad_image_stops_the_run_naming_file_record_and_image(tiny_ckpt, bench, tmp_path):
    args = _bad_args(tiny_ckpt[0], bench, tmp_path / "out")
    where = re.escape(f"{bench / 'bad.json'}, record ")
    # missing: met while reading headers (to sort by prompt length), before any generation
    with pytest.raises(SystemExit, match=where + re.escape(f"2: cannot read image {bench / 'bad' / 'bad_2.png'} (")
                       + ".*pass --skip-bad"):
        E.main(args)
    # truncated: the header reads, the pixels fail when its batch is decoded
    with pytest.raises(SystemExit, match=where + re.escape(f"1: cannot read image {bench / 'bad' / 'bad_1.png'} (")
                       + ".*truncated"):
        E.main(args + ["--limit", "2"])


def test_skip_bad_skips_and_counts_a_missing_and_a_truncated_image(tiny_ckpt, bench, tmp_path, capsys):
    out = tmp_path / "out"
    args = _bad_args(tiny_ckpt[0], bench, out) + ["--skip-bad"]
    for _ in range(2):  # the second time resumes: the skipped records are tried again, and counted again
        assert E.main(args) == 0
        warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning: skipped" in ln]
        assert len(warnings) == 2
        assert any("bad.json, record 1: cannot read image" in w and "bad_1.png" in w for w in warnings)
        assert any("bad.json, record 2: cannot read image" in w and "bad_2.png" in w for w in warnings)
        task = json.loads((out / "metrics.json").read_text())["tasks"]["bad"]
        assert (task["n"], task["n_skipped"]) == (2, 2)
        assert [r["index"] for r in _records(out, "bad")[1]] == [0, 3]  # the batch went on without record 1
    assert E.main(args + ["--limit", "2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["tasks"]["bad"]["n_skipped"] == 1  # of 2 asked


def test_two_processes_match_one_even_with_fewer_records_than_ranks(tiny_ckpt, bench, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    common = ["--model", tiny_ckpt[0], "--data-root", str(bench), "--tasks", "AID,DIOR-RSVG,LHRS-Bench",
              "--task-file", str(bench / "one.json"), "--task-file", str(bench / "bad.json"), "--task-type", "vqa",
              "--batch-size", "2", "--max-new-tokens", "5", "--zoom", "--skip-bad"]
    one = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "evaluate.py"), *common,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert list(m2["tasks"]) == ["AID", "DIOR-RSVG", "LHRS-Bench", "one", "bad"]
    assert _strip(m1["tasks"]) == _strip(m2["tasks"]) and m2["tasks"]["one"]["n"] == 1
    assert m2["tasks"]["bad"]["n_skipped"] == 2 and m2["tasks"]["bad"]["n"] == 2
    for res in (one, two):  # one warning per skipped record, whichever rank met it, however many ranks
        assert res.stderr.count("warning: skipped") == 2, res.stderr[-3000:]
    for name in m1["tasks"]:
        h1, r1 = _records(tmp_path / "one", name)
        h2, r2 = _records(tmp_path / "two", name)
        assert h1 == h2 and [_strip(r) for r in r1] == [_strip(r) for r in r2]
    assert not list((tmp_path / "two").glob("*.part*"))  # rank part files merged away


def test_speed_compares_plain_and_think(tiny_ckpt, bench, tmp_path, capsys):
    out = tmp_path / "speed"
    assert E.main(["--model", tiny_ckpt[0], "--data-root", str(bench), "--tasks", "LR-presence", "--out", str(out),
                   "--limit", "2", "--max-new-tokens", "4", "--speed", "--prompts", "ours"]) == 0
    text = (out / "speed.md").read_text()
    assert "plain |" in text and "think |" in text and "Latency think" in text
    meta, recs = _records(out / "think", "LR-presence")
    assert (meta["meta"]["mode"], meta["meta"]["prompts"]) == ("think", "ours")
    assert TASK_PROMPTS["vqa"].replace("{q}", "Is there a road?") + "<|im_end|>" in recs[0]["prompt"]
    assert "<|im_start|>system\nA conversation between User and Assistant." in recs[0]["prompt"]
    assert "Latency think" in capsys.readouterr().out


def test_speed_weights_run_each_format_in_its_own_process(tiny_ckpt, bench, tmp_path, capsys):
    out = tmp_path / "formats"
    common = ["--model", tiny_ckpt[0], "--data-root", str(bench), "--tasks", "LR-presence", "--limit", "2",
              "--max-new-tokens", "4", "--speed", "--prompts", "ours"]
    assert E.main(common + ["--out", str(out), "--speed-weights", "float32,int8"]) == 0
    text = (out / "speed.md").read_text()
    assert all(f"| {w} {m} |" in text for w in ("float32", "int8") for m in ("plain", "think")), text
    for w in ("float32", "int8"):
        meta, recs = _records(out / w / "plain", "LR-presence")
        assert meta["meta"]["dtype"] == "float32" and meta["meta"].get("quantize") == ("int8" if w == "int8" else None)
        assert len(recs) == 2 and all(r["peak_mem_gb"] > 0 for r in recs)
    # the float32 child is the plain single-format run: the same answers as one run in this process
    assert E.main(common + ["--out", str(tmp_path / "one")]) == 0
    assert [r["pred"] for r in _records(out / "float32" / "think", "LR-presence")[1]] == \
        [r["pred"] for r in _records(tmp_path / "one" / "think", "LR-presence")[1]]
    with pytest.raises(SystemExit):
        E.main(common + ["--out", str(out), "--speed-weights", "float32,int4"])
