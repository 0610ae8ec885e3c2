"""demo.py: the --quick pipeline end to end (synth -> the ablation's runs on 2 ranks -> evaluation -> results).

Checks the files, the table's rows and columns, and that every number in results.json is the one its source
holds (each evaluation's metrics.json and per-record predictions, GRPO's metrics.jsonl); not the learning
claims, which need the full run (`python demo.py` without --quick)."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import demo
from rewards import format_reward

ROWS = ["S", "P+S", "P+S+C", "P+S+R", "P+S+C+R"]
COLS = ["classification", "vqa", "grounding_pr50", "grounding_miou", "mcq", "format_rate"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert demo.main(["--out", str(out), "--quick", "--seed", "0"]) == 0
    return out


def lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_files(quick):
    for name, stage, _ in demo.STAGES:
        assert (quick / name / "final" / "model.safetensors").is_file()
        assert len(lines(quick / name / "metrics.jsonl")) == demo.QUICK[stage]["max_steps"]
    for name in ("results.md", "results.json", "config.json", "times.json", "synth/meta.json"):
        assert (quick / name).is_file(), name
    for png in ("loss.png", "reward.png", "reward_PSR.png"):
        with Image.open(quick / png) as im:
            assert im.format == "PNG" and im.size == (900, 400)


def test_table_rows_and_columns(quick):
    res = json.loads((quick / "results.json").read_text())
    assert [r["row"] for r in res["rows"]] == ROWS
    assert [r["mode"] for r in res["rows"]] == ["plain", "plain", "think", "think", "think"]
    for r in res["rows"]:
        assert set(COLS) <= set(r)
        assert all(r[c] is None or 0.0 <= r[c] <= 1.0 for c in COLS)
    md = (quick / "results.md").read_text().splitlines()
    header = next(ln for ln in md if ln.startswith("| Stages"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Stages", "Mode"] + [h for _, h in demo.COLUMNS]
    first = md.index(header)
    body = md[first + 2:md.index("", first)]  # the first table, up to the blank line after it
    assert [ln.split("|")[1].strip() for ln in body] == ROWS
    # each cell is the results.json number in percent
    for ln, r in zip(body, res["rows"]):
        cells = [c.strip() for c in ln.strip("|").split("|")][2:]
        assert cells == ["-" if r[c] is None else f"{100 * r[c]:.1f}" for c in COLS]


def test_numbers_come_from_the_evaluations(quick):
    res = json.loads((quick / "results.json").read_text())
    n = demo.QUICK["synth"]["n_eval"]
    assert res["n_eval"] == {name: n for name in demo.EVAL_FILES}
    for r, (row, name, mode) in zip(res["rows"] + [res["int8"]["row"]], demo.ROWS + [("", "PSCR", "think")]):
        folder = quick / r["eval_dir"]
        m = json.loads((folder / "metrics.json").read_text())
        assert m["meta"]["mode"] == mode and m["meta"]["model"] == str((quick / name / "final").resolve())
        assert m["meta"].get("quantize") == ("int8" if r["row"].endswith("int8") else None)
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
    for name in ("PSR", "PSCR"):
        steps = lines(quick / name / "metrics.jsonl")
        rewards = [x["reward"] for x in steps]
        q = max(1, len(rewards) // 4)
        trend = res["grpo_reward"][name]
        assert (trend["steps"], trend["first_quarter"], trend["last_quarter"]) == (
            len(rewards), sum(rewards[:q]) / q, sum(rewards[-q:]) / q)
        for kind, v in trend["accuracy_by_type"].items():
            vals = [x[f"accuracy_{kind}"] for x in steps if f"accuracy_{kind}" in x]
            k = max(1, len(vals) // 4)
            assert v == {"first_quarter": sum(vals[:k]) / k, "last_quarter": sum(vals[-k:]) / k}
    rows = {r["row"]: r for r in res["rows"]}
    assert res["int8"]["delta"] == {c: res["int8"]["row"][c] - rows["P+S+C+R"][c] for c in demo.RECORD_SCORES}


def test_effects_are_paired_differences_of_the_rows(quick):
    res = json.loads((quick / "results.json").read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert [(e["row"], e["against"]) for e in res["effects"]] == [
        ("P+S", "S"), ("P+S+C", "P+S"), ("P+S+C+R", "P+S+R"), ("P+S+C+R", "P+S+C"), ("P+S+R", "P+S")]
    for e in res["effects"]:
        for c, d in e["diffs"].items():
            assert d["diff"] == pytest.approx(rows[e["row"]][c] - rows[e["against"]][c], abs=1e-12)
            assert d["lo"] <= d["diff"] <= d["hi"]
    md = (quick / "results.md").read_text()
    assert "| C | P+S+C - P+S |" in md and "paper +3.7" in md


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    shared = rng.random(400) < 0.5  # what both runs get right together cancels in a paired comparison
    a = (shared | (rng.random(400) < 0.3)).astype(float)
    b = (shared | (rng.random(400) < 0.1)).astype(float)
    d = demo.paired_bootstrap(a, b)
    se = (a - b).std() / np.sqrt(len(a))
    assert d["diff"] == pytest.approx((a - b).mean())
    assert d["lo"] == pytest.approx(d["diff"] - 1.96 * se, abs=0.15 * 1.96 * se)
    assert d["hi"] == pytest.approx(d["diff"] + 1.96 * se, abs=0.15 * 1.96 * se)
    same = demo.paired_bootstrap(a, a)
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same records"):
        demo.paired_bootstrap(a, b[:-1])


def test_rerun_skips_everything_and_refuses_other_settings(quick, capsys):
    before = (quick / "results.json").read_text()
    stamps = {p: os.path.getmtime(p) for p in quick.glob("*/final/model.safetensors")}
    assert demo.main(["--out", str(quick), "--quick", "--seed", "0"]) == 0
    said = capsys.readouterr().out
    assert all(f"{name}: {quick.resolve() / name / 'final'} exists, skipped" in said for name, *_ in demo.STAGES)
    assert "eval S:" not in said and "eval P+S+C+R int8:" not in said  # evaluations found complete
    assert {p: os.path.getmtime(p) for p in stamps} == stamps
    rows = lambda s: json.loads(s)["rows"]  # noqa: E731
    assert rows((quick / "results.json").read_text()) == rows(before)
    with pytest.raises(SystemExit, match="other settings"):
        demo.main(["--out", str(quick), "--quick", "--seed", "1"])


def test_rerun_of_a_stage_is_identical(quick, tmp_path, capsys):
    """Same seed, same table, on the stage that samples: a copy of the run without PSCR/ retrains that R run (and
    only it, then its evaluations) to the same bytes and the same table. Two full runs from scratch give the same table
    and the same weights at every stage; that takes too long for the suite, so this cheaper check stays in it."""
    again = tmp_path / "again"
    shutil.copytree(quick, again)
    shutil.rmtree(again / "PSCR")
    capsys.readouterr()
    assert demo.main(["--out", str(again), "--quick", "--seed", "0"]) == 0
    said = capsys.readouterr().out
    assert "PSCR: train_grpo.py (grpo) from PSC" in said and "eval P+S+C+R: done" in said
    assert "eval P+S+C+R int8: done" in said
    assert "PSR: train_grpo.py" not in said and "eval P+S+C: done" not in said and "eval P+S+R: done" not in said
    assert (again / "results.md").read_text() == (quick / "results.md").read_text()
    f = "PSCR/final/model.safetensors"
    assert (again / f).read_bytes() == (quick / f).read_bytes()
    assert (again / "PSCR/metrics.jsonl").read_text().count("\n") == demo.QUICK["grpo"]["max_steps"]


def test_flags_and_chart(tmp_path):
    assert demo.flags({"max_steps": 3, "grad_ckpt": True, "pack": False, "lr": None}) == ["--max-steps", "3",
                                                                                        "--grad-ckpt"]
    demo.line_chart(tmp_path / "c.png", "one point", {"a": [(1, 0.5)], "b": []}, "y")  # degenerate: no crash
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (900, 400)
