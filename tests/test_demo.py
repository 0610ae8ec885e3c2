"""demo.py: the --quick pipeline end to end (synth -> P -> S -> C -> R on 2 ranks -> evaluation -> results).

Checks the files, the table's rows and columns, and that every number in results.json is the one its source
holds (each evaluation's metrics.json and per-record predictions, GRPO's metrics.jsonl); not the learning
claims, which need the full run (`python demo.py` without --quick)."""
import json
import os
import shutil

import pytest
from PIL import Image

import demo
from rewards import format_reward

ROWS = ["P", "P+S", "P+S+C", "P+S+C+R"]
COLS = ["classification", "vqa", "grounding_pr50", "grounding_miou", "mcq", "format_rate"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert demo.main(["--out", str(out), "--quick", "--seed", "0"]) == 0
    return out


def lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_files(quick):
    for stage, *_ in demo.STAGES:
        assert (quick / stage / "final" / "model.safetensors").is_file()
        assert len(lines(quick / stage / "metrics.jsonl")) == demo.QUICK[stage]["max_steps"]
    for name in ("results.md", "results.json", "config.json", "times.json", "synth/meta.json"):
        assert (quick / name).is_file(), name
    for png in ("loss.png", "reward.png"):
        with Image.open(quick / png) as im:
            assert im.format == "PNG" and im.size == (900, 400)


def test_table_rows_and_columns(quick):
    res = json.loads((quick / "results.json").read_text())
    assert [r["row"] for r in res["rows"]] == ROWS
    assert [r["mode"] for r in res["rows"]] == ["plain", "plain", "think", "think"]
    for r in res["rows"]:
        assert set(COLS) <= set(r)
        assert all(r[c] is None or 0.0 <= r[c] <= 1.0 for c in COLS)
    md = (quick / "results.md").read_text().splitlines()
    header = next(ln for ln in md if ln.startswith("| Stages"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Stages", "Mode"] + [h for _, h in demo.COLUMNS]
    body = [ln for ln in md if ln.startswith("| P")]
    assert [ln.split("|")[1].strip() for ln in body] == ROWS
    # each cell is the results.json number in percent
    for ln, r in zip(body, res["rows"]):
        cells = [c.strip() for c in ln.strip("|").split("|")][2:]
        assert cells == ["-" if r[c] is None else f"{100 * r[c]:.1f}" for c in COLS]


def test_numbers_come_from_the_evaluations(quick):
    res = json.loads((quick / "results.json").read_text())
    n = demo.QUICK["synth"]["n_eval"]
    assert res["n_eval"] == {name: n for name in demo.EVAL_FILES}
    for r, (row, stage, mode) in zip(res["rows"], demo.ROWS):
        folder = quick / res["eval_dirs"][row]
        m = json.loads((folder / "metrics.json").read_text())
        assert m["meta"]["mode"] == mode and m["meta"]["model"] == str((quick / stage / "final").resolve())
        assert m["meta"]["prompts"] == "ours"  # the wording the synthetic data was trained in
        t = m["tasks"]
        assert r["classification"] == t["cls_synth"]["acc_strict"]
        assert r["vqa"] == t["vqa_synth"]["acc_strict"]
        assert r["grounding_pr50"] == t["vg_synth"]["pr@0.5"]
        assert r["grounding_miou"] == t["vg_synth"]["mean_iou"]
        assert r["mcq"] == t["mcq_synth"]["acc_strict"]
        preds = [x["pred"] for name in demo.EVAL_FILES for x in lines(folder / f"{name}.jsonl") if "index" in x]
        assert len(preds) == 4 * n
        if mode == "think":
            assert r["format_rate"] == sum(map(format_reward, preds)) / len(preds)
        else:
            assert r["format_rate"] is None
    rewards = [x["reward"] for x in lines(quick / "grpo" / "metrics.jsonl")]
    q = max(1, len(rewards) // 4)
    assert res["grpo_reward"] == {"steps": len(rewards), "first_quarter": sum(rewards[:q]) / q,
                                  "last_quarter": sum(rewards[-q:]) / q}


def test_rerun_skips_everything_and_refuses_other_settings(quick, capsys):
    before = (quick / "results.json").read_text()
    stamps = {p: os.path.getmtime(p) for p in quick.glob("*/final/model.safetensors")}
    assert demo.main(["--out", str(quick), "--quick", "--seed", "0"]) == 0
    said = capsys.readouterr().out
    assert all(f"{stage}: {quick.resolve() / stage / 'final'} exists, skipped" in said for stage, *_ in demo.STAGES)
    assert "eval P:" not in said  # evaluations found complete
    assert {p: os.path.getmtime(p) for p in stamps} == stamps
    rows = lambda s: json.loads(s)["rows"]  # noqa: E731
    assert rows((quick / "results.json").read_text()) == rows(before)
    with pytest.raises(SystemExit, match="other settings"):
        demo.main(["--out", str(quick), "--quick", "--seed", "1"])


def test_rerun_of_a_stage_is_identical(quick, tmp_path, capsys):
    """Same seed, same table, on the stage that samples: a copy of the run without grpo/ retrains R (and only
    R, then its evaluation) to the same bytes and the same table. Two full runs from scratch give the same table
    and the same weights at every stage; that takes too long for the suite, so this cheaper check stays in it."""
    again = tmp_path / "again"
    shutil.copytree(quick, again)
    shutil.rmtree(again / "grpo")
    capsys.readouterr()
    assert demo.main(["--out", str(again), "--quick", "--seed", "0"]) == 0
    said = capsys.readouterr().out
    assert "grpo: train_grpo.py from cot" in said and "eval P+S+C+R: done" in said
    assert "sft: train_sft.py" not in said and "eval P+S+C: done" not in said
    assert (again / "results.md").read_text() == (quick / "results.md").read_text()
    f = "grpo/final/model.safetensors"
    assert (again / f).read_bytes() == (quick / f).read_bytes()
    assert (again / "grpo/metrics.jsonl").read_text().count("\n") == demo.QUICK["grpo"]["max_steps"]


def test_flags_and_chart(tmp_path):
    assert demo.flags({"max_steps": 3, "grad_ckpt": True, "pack": False, "lr": None}) == ["--max-steps", "3",
                                                                                        "--grad-ckpt"]
    demo.line_chart(tmp_path / "c.png", "one point", {"a": [(1, 0.5)], "b": []}, "y")  # degenerate: no crash
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (900, 400)
