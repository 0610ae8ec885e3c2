"""The embedded default pipeline: the whole TinyRS recipe and its ablation, end to end, on one CPU machine.

    python demo.py --out runs/demo [--seed 0] [--quick] [--nproc 2]      (`make demo` runs this)

Why a separate file: synth.py, train_sft.py, train_grpo.py and evaluate.py are each one tool with its own
flags; the recipe is the order they run in and the settings that make a tiny model learn on synthetic data
in minutes. This is the one place that holds both: synth -> tiny model -> the paper's ablation rows (S alone,
P+S, P+S+C, P+S+R, P+S+C+R: P pre-training, S instruction SFT, C CoT SFT, R GRPO) -> evaluation of every row,
each stage's effect with a paired-bootstrap 95% interval, and the final model again with int8 weights ->
OUT/results.md, OUT/results.json, OUT/loss.png and OUT/reward.png. It only calls the tools' command lines, training and evaluation under torchrun with --nproc
ranks (FSDP2 needs one process per rank), so what it shows holds for anyone who runs them by hand.

Resumable: a step whose output exists (OUT/<run>/final, OUT/eval/<run>-<mode>/metrics.json) is skipped unless
a step it starts from ran again; OUT/config.json refuses an OUT made with other settings. Each tool's output goes to
OUT/logs/<step>.log. Same seed, same settings: the same checkpoints, byte for byte, and the same table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
EVAL_FILES = {"cls_synth": "cls", "vqa_synth": "vqa", "vg_synth": "bbox", "mcq_synth": "mcq"}
# The synthetic images (224 px) seen unresized, as the tiny model's processor sees them in evaluation; the
# training tools' defaults (the paper's 512..1280 * 28 * 28) would upscale them to ~8x the image tokens.
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 224 * 224}
# One micro-batch per rank and step; one loader worker per rank (2 ranks on 2 cores). No weight decay: a few
# hundred steps from random weights have nothing to regularise. Packed rows (padding was a third of P's tokens).
# bf16 compute with fp32 master weights: 1.26x faster steps on the AMD EPYC (AVX-512 BF16), 1.3x on the Xeon (AMX).
SFT_COMMON = {**PIXELS, "global_batch": 16, "micro_batch": 8, "max_len": 512, "workers": 1,
              "warmup_ratio": 0.05, "weight_decay": 0.0, "pack": True, "bf16": True}

# Flags of each tool, by stage (snake_case -> --kebab-case; True -> a bare flag); both runs of a stage (S alone and
# after P; R after P+S and after P+S+C) share them. On 2 CPU cores the six runs and seven evaluations take ~17-18 min.
# The vision tower starts from random weights, so it trains at the LLM's lr (the paper's 2e-6 is for a trained
# one); a tiny model wants a far higher lr than the paper's 1e-5.
FULL = {
    # n_pretrain_vg, n_sft_vg, n_grpo_vg: one-object grounding questions (synth.single_object_scene) in P, S/C and R
    "synth": {"n_pretrain": 1000, "n_pretrain_vg": 3000, "n_sft": 1000, "n_sft_vg": 600, "questions_per_image": 2,
              "n_grpo": 300, "n_grpo_vg": 300, "n_eval": 200},
    "tiny": {},
    # 400 steps over 1,000 captions and 3,000 one-object grounding questions: P alone then grounds 33.5% of the
    # evaluation split (320 steps: 11%; the jump from chance comes late).
    "pretrain": {**SFT_COMMON, "max_steps": 400, "lr": 2e-3, "vision_lr": 2e-3},
    # No task balancing: balancing doubles grounding's share, and its ~20 digit tokens per answer then drown the
    # 1-token classification answers in the token-mean loss. 5e-4, not 2e-3: at 2e-3 S took P's grounding from
    # 33.5% to 9.5%, at 5e-4 to 20.5%, and with the one-object questions kept in its data to 33%.
    "sft": {**SFT_COMMON, "max_steps": 180, "lr": 5e-4, "vision_lr": 5e-4, "warmup_ratio": 0.1, "no_balance": True},
    # Unbalanced, as S. 1e-3: at 2e-3 C took P+S to 93.5% classification but P's grounding to chance (8.5%); at
    # 5e-4 grounding fell to 20% and classification to 82% (the reasoning named the right class, the answer another:
    # copying was not learnt yet); at 1e-3 94.0% and 29.5%.
    "cot": {**SFT_COMMON, "max_steps": 270, "lr": 1e-3, "vision_lr": 1e-3, "no_balance": True},
    # positional: a box far from the target still earns reward by its distance (IoU alone is 0 almost always
    # for a model this weak), so grounding rollouts differ within their group and GRPO has a signal.
    # 16 prompts a step (the paper's batch): with 8, the step-to-step task mix makes the reward too noisy to
    # read a trend. Temperature 0.7: at 1.0 the tiny model's samples are mostly wrong (box reward 0.05 against
    # 0.19, closed answers 0.41 against 0.53, on the same model). beta 0, not the paper's 0.001: the penalty is
    # ~1e-5 here (KL <= 0.016 over 30 steps) and the reference model's forward took 1/7 of each step (138 -> 118 s).
    # Log-probabilities at T 1, not the sampling 0.7 (train_grpo.logprob_temperature): that off-policy gradient
    # kept P+S+C's classification at 97.0% over 120 steps where the on-policy one let it fall to 85.0%
    # (one run each; grounding 30.0% both). One update forward per rank and step (micro_prompts 8): 1.45 s, not 1.58.
    "grpo": {**PIXELS, "max_steps": 30, "prompts_per_step": 16, "num_generations": 4, "micro_prompts": 8,
             "max_completion_len": 96, "lr": 1e-4, "beta": 0.0, "rewards": "format,accuracy,positional",
             "temperature": 0.7, "logprob_temperature": 1.0, "bf16": True},
    "eval": {"batch_size": 16, "plain_tokens": 64, "think_tokens": 128},  # think answers are <= 80 tokens
}
# --quick: the same pipeline, a few steps each (the test suite runs it).
QUICK = {
    "synth": {"n_pretrain": 32, "n_pretrain_vg": 16, "n_sft": 32, "n_sft_vg": 8, "questions_per_image": 1, "n_grpo": 8,
              "n_grpo_vg": 4, "n_eval": 8},
    "tiny": {},
    "pretrain": {**FULL["pretrain"], "max_steps": 2},
    "sft": {**FULL["sft"], "max_steps": 2},
    "cot": {**FULL["cot"], "max_steps": 2},
    "grpo": {**FULL["grpo"], "max_steps": 2, "prompts_per_step": 2, "num_generations": 2, "max_completion_len": 8},
    "eval": {"batch_size": 8, "plain_tokens": 8, "think_tokens": 8},
}
# Training runs, in order: (run, stage, starts from). The stage picks the tool, its data file and its settings.
STAGES = [("P", "pretrain", "tiny"), ("S", "sft", "tiny"), ("PS", "sft", "P"), ("PSC", "cot", "PS"),
          ("PSR", "grpo", "PS"), ("PSCR", "grpo", "PSC")]
TOOLS = {"pretrain": ("train_sft.py", "pretrain.json"), "sft": ("train_sft.py", "sft.json"),
         "cot": ("train_sft.py", "cot.json"), "grpo": ("train_grpo.py", "grpo.jsonl")}
# The table's rows, the paper's ablation (Table II): (row, run, evaluation mode). Rows after GRPO answer in the
# reasoning format GRPO trained (its system prompt); S and P+S answer plainly, as they were trained.
ROWS = [("S", "S", "plain"), ("P+S", "PS", "plain"), ("P+S+C", "PSC", "think"), ("P+S+R", "PSR", "think"),
        ("P+S+C+R", "PSCR", "think")]
COLUMNS = [("classification", "Classification"), ("vqa", "VQA"), ("grounding_pr50", "Grounding Pr@0.5"),
           ("grounding_miou", "Grounding mIoU"), ("mcq", "Multiple choice"), ("format_rate", "Format (think)")]
# Each stage's effect: (stage, row, the row without it, the paper's difference in points where Table II gives one)
EFFECTS = [("P", "P+S", "S", {"classification": 1.0, "grounding_pr50": 1.7}),
           ("C", "P+S+C", "P+S", {"classification": 3.7, "vqa": -5.2}),
           ("C, both with R", "P+S+C+R", "P+S+R", {"classification": 3.5, "vqa": -2.4, "grounding_pr50": 5.4}),
           ("R", "P+S+C+R", "P+S+C", {"classification": 0.9, "grounding_pr50": 4.9}),
           ("R without C", "P+S+R", "P+S", {})]
# Per-record scores behind each column compared (file, score of one output line)
RECORD_SCORES = {"classification": ("cls_synth", lambda r: float(r["strict"])),
                 "vqa": ("vqa_synth", lambda r: float(r["strict"])),
                 "grounding_pr50": ("vg_synth", lambda r: sum(v >= 0.5 for v in r["iou"]) / len(r["iou"])),
                 "mcq": ("mcq_synth", lambda r: float(r["strict"]))}
INT8_ROW = "P+S+C+R"  # evaluated again with int8 weights (evaluate.py --quantize int8)
INT8_RUN = {row: run for row, run, _ in ROWS}[INT8_ROW]


def log(msg: str):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def flags(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        if v is True:
            out.append("--" + k.replace("_", "-"))
        elif v is not None and v is not False:
            out += ["--" + k.replace("_", "-"), str(v)]
    return out


def run(name: str, args: list, out: Path, nproc: int = 1) -> float:
    """Run a tool (under torchrun when nproc > 1), its output into OUT/logs/NAME.log; seconds taken."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    # One thread per worker: 2 ranks on 2 cores, no oversubscription (and same kernels run to run).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    logfile = out / "logs" / f"{name}.log"
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        r = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = "".join(logfile.read_text(errors="replace").splitlines(True)[-30:])
        raise SystemExit(f"{name} failed (exit {r.returncode}); last lines of {logfile}:\n{tail}")
    return time.perf_counter() - t0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def train_stages(out: Path, cfg: dict, seed: int, nproc: int, times: dict) -> set:
    """synth, tiny model, then every training run of STAGES. A step is skipped when its output exists, unless
    the step it starts from ran now (its input changed); returns the steps run now."""
    ran = set()
    synth, tiny = out / "synth", out / "tiny"
    if not (synth / "meta.json").exists():  # written last
        log("synth: drawing the synthetic remote-sensing world")
        times["synth"] = run("synth", ["synth.py", "synth", "--out", synth, "--seed", seed, *flags(cfg["synth"])], out)
        ran.add("synth")
    if ran or not (tiny / "example.png").exists():  # written after the checkpoint
        log("tiny: building the tiny Qwen2-VL and its tokenizer")
        times["tiny"] = run("tiny", ["synth.py", "tiny", "--out", tiny, "--seed", seed, *flags(cfg["tiny"])], out)
        ran.add("tiny")
    for name, stage, start in STAGES:
        final = out / name / "final"  # saved atomically: there means complete
        if final.exists() and start not in ran:
            log(f"{name}: {final} exists, skipped")
            continue
        shutil.rmtree(out / name, ignore_errors=True)  # an interrupted or outdated run's leftovers
        src = tiny if start == "tiny" else out / start / "final"
        script, data = TOOLS[stage]
        extra = ["--stage", stage] if script == "train_sft.py" else []
        log(f"{name}: {script} ({stage}) from {start}, {cfg[stage]['max_steps']} steps")
        times[name] = run(name, [script, "--model", src, "--data", synth / data, "--out", out / name, "--seed", seed,
                                 *extra, *flags(cfg[stage])], out, nproc)
        ran.add(name)
        log(f"{name}: done in {times[name]:.0f} s ({stage_summary(out / name)})")
    return ran


def quarters(values: list) -> tuple[float, float]:
    """Means of the first and the last quarter of a curve: single steps are too noisy to compare."""
    q = max(1, len(values) // 4)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def stage_summary(folder: Path) -> str:
    m = read_jsonl(folder / "metrics.jsonl")
    if not m:
        return "no metrics"
    key = "reward" if "reward" in m[0] else "loss"
    first, last = quarters([r[key] for r in m])
    return f"mean {key} {first:.3f} over the first quarter of steps -> {last:.3f} over the last"


def evaluate_rows(out: Path, cfg: dict, nproc: int, times: dict, retrained: set) -> dict:
    """Evaluate each row's checkpoint on the synthetic eval split, and INT8_ROW's again with int8 weights;
    {label: OUT/eval/<run>-<mode>[-int8]/metrics.json content}."""
    ev = out / "synth" / "eval"
    files = [a for name, kind in EVAL_FILES.items() for a in ("--task-file", ev / f"{name}.json", "--task-type", kind)]
    results = {}
    for label, name, mode, int8 in [(r, n, m, False) for r, n, m in ROWS] + [
            (f"{INT8_ROW} int8", INT8_RUN, "think", True)]:
        folder = out / eval_dir(name, mode, int8)
        if name in retrained:  # predictions of an earlier checkpoint of the same run must not be resumed
            shutil.rmtree(folder, ignore_errors=True)
        metrics = folder / "metrics.json"
        if not (metrics.exists() and set(json.loads(metrics.read_text())["tasks"]) == set(EVAL_FILES)):
            log(f"eval {label}: {name}/final in {mode} mode")
            tokens = cfg["eval"]["think_tokens" if mode == "think" else "plain_tokens"]
            # --prompts ours: the synthetic questions were trained in data.TASK_PROMPTS wording, not the public one
            times[f"eval {label}"] = run(f"eval-{folder.name}", [
                "evaluate.py", "--model", out / name / "final", *files, "--out", folder, "--mode", mode,
                "--prompts", "ours", "--batch-size", cfg["eval"]["batch_size"], "--max-new-tokens", tokens,
                "--overwrite", *(["--quantize", "int8"] if int8 else [])], out, nproc)
            t = json.loads(metrics.read_text())["tasks"]
            log(f"eval {label}: done in {times[f'eval {label}']:.0f} s (accuracy % " + ", ".join(
                f"{n} {100 * t[n]['score']:.1f}" for n in EVAL_FILES if n != "vg_synth")
                + f"; grounding Pr@0.5 % {100 * t['vg_synth']['pr@0.5']:.1f})")
        results[label] = json.loads(metrics.read_text())
    return results


def eval_dir(name: str, mode: str, int8: bool = False) -> str:
    return f"eval/{name}-{mode}" + ("-int8" if int8 else "")


def format_rate(folder: Path) -> float:
    """Share of all predictions (every task) that match the reasoning format exactly (the GRPO format reward)."""
    from rewards import format_reward
    preds = [r["pred"] for name in EVAL_FILES for r in read_jsonl(folder / f"{name}.jsonl") if "index" in r]
    return sum(format_reward(p) for p in preds) / len(preds)


def table_row(out: Path, label: str, name: str, mode: str, m: dict, int8: bool = False) -> dict:
    t = m["tasks"]
    return {"row": label, "checkpoint": f"{name}/final", "mode": mode, "eval_dir": eval_dir(name, mode, int8),
            "classification": t["cls_synth"]["acc_strict"], "vqa": t["vqa_synth"]["acc_strict"],
            "grounding_pr50": t["vg_synth"]["pr@0.5"], "grounding_miou": t["vg_synth"]["mean_iou"],
            "mcq": t["mcq_synth"]["acc_strict"],
            "format_rate": format_rate(out / eval_dir(name, mode, int8)) if mode == "think" else None}


def record_scores(folder: Path, column: str) -> list[float]:
    """One score per evaluation record of `column`, in record order (the table's number is their mean)."""
    file, score = RECORD_SCORES[column]
    return [score(r) for r in sorted((r for r in read_jsonl(folder / f"{file}.jsonl") if "index" in r),
                                     key=lambda r: r["index"])]


def paired_bootstrap(a: list, b: list, resamples: int = 10000, seed: int = 0) -> dict:
    """mean(a) - mean(b) over the same records, and its 95% interval: records resampled with replacement, the
    same draw for both (so what the two runs share cancels), the 2.5th and 97.5th percentiles of the difference."""
    import numpy as np
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"a paired comparison needs the same records on both sides: {a.shape} vs {b.shape}")
    idx = np.random.default_rng(seed).integers(0, len(a), (resamples, len(a)))
    diffs = (a - b)[idx].mean(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": float((a - b).mean()), "lo": float(lo), "hi": float(hi)}


def stage_effects(out: Path, rows: dict) -> list[dict]:
    """Every EFFECTS line: per column the paired difference (row - row without the stage), its interval, the
    paper's number."""
    effects = []
    for stage, row, base, paper in EFFECTS:
        diffs = {c: paired_bootstrap(record_scores(out / rows[row]["eval_dir"], c),
                                     record_scores(out / rows[base]["eval_dir"], c)) for c in RECORD_SCORES}
        effects.append({"stage": stage, "row": row, "against": base, "diffs": diffs, "paper": paper})
    return effects


def reward_trend(out: Path, run_name: str) -> dict:
    """A GRPO run's mean reward over the first and the last quarter of its steps, in all and per answer type."""
    m = read_jsonl(out / run_name / "metrics.jsonl")
    first, last = quarters([x["reward"] for x in m])
    trend = {"steps": len(m), "first_quarter": first, "last_quarter": last, "accuracy_by_type": {}}
    for k in sorted({k for x in m for k in x if k.startswith("accuracy_")}):  # per answer type, steps that had it
        vals = [x[k] for x in m if k in x]
        trend["accuracy_by_type"][k.removeprefix("accuracy_")] = dict(zip(("first_quarter", "last_quarter"),
                                                                         quarters(vals)))
    return trend


def markdown(rows: list[dict], effects: list[dict], trends: dict, n_eval: dict, int8: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| Stages | Mode | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    lines += [f"| {r['row']} | {r['mode']} | " + " | ".join(pct(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    names = dict(COLUMNS)
    lines += ["", "Each stage's effect, points (ours: paired difference over the same records [95% bootstrap "
                  "interval]; paper: Table II of the TinyRS-R1 paper, where it reports the column):", "",
              "| Stage | Rows | " + " | ".join(names[c] for c in RECORD_SCORES) + " |",
              "|---" * (len(RECORD_SCORES) + 2) + "|"]
    for e in effects:
        cells = []
        for c in RECORD_SCORES:
            d = e["diffs"][c]
            paper = f"; paper {e['paper'][c]:+.1f}" if c in e["paper"] else ""
            cells.append(f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]{paper}")
        lines.append(f"| {e['stage']} | {e['row']} - {e['against']} | " + " | ".join(cells) + " |")
    lines += ["", "Percent on the synthetic evaluation split (" + ", ".join(f"{k} {v}" for k, v in n_eval.items())
              + " records): strict accuracy; grounding Pr@0.5 and mean IoU; format: share of answers in "
              "<reasoning>...</reasoning><answer>...</answer> form (think mode only)."]
    for name, t in trends.items():
        by_type = ", ".join(f"{k} {v['first_quarter']:.3f} -> {v['last_quarter']:.3f}"
                            for k, v in t["accuracy_by_type"].items())
        lines.append(f"GRPO {name}: mean reward {t['first_quarter']:.3f} over the first quarter of its {t['steps']} "
                     f"steps, {t['last_quarter']:.3f} over the last" + (f" (accuracy reward by answer type: "
                                                                        f"{by_type})" if by_type else "") + ".")
    lines.append(f"{INT8_ROW} with int8 weights (evaluate.py --quantize int8), points against fp32: " + ", ".join(
        f"{names[c]} {pct(int8['row'][c])} ({100 * int8['delta'][c]:+.1f})" for c in int8["delta"]) + ".")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Curves, drawn with pillow (no plotting dependency)
def line_chart(path: Path, title: str, series: dict, ylabel: str, size=(900, 400)):
    """series: {name: [(x, y), ...]}, drawn on shared axes in distinct colours, with a legend on the right."""
    from PIL import Image, ImageDraw
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
    w, h = size
    left, right, top, bottom = 60, 190, 36, 40  # the legend goes in the right margin
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    pts = [p for s in series.values() for p in s]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)  # losses and rewards: from 0
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    for i in range(5):  # ticks and light grid lines
        y, x = y0 + i * (y1 - y0) / 4, x0 + i * (x1 - x0) / 4
        d.line([left, sy(y), w - right, sy(y)], fill=(225, 225, 225))
        d.text((4, sy(y) - 6), f"{y:.3g}", fill="black")
        d.text((sx(x) - 8, h - bottom + 6), f"{x:.0f}", fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((left, 10), title, fill="black")
    d.text(((left + w - right) // 2 - 12, h - 16), "step", fill="black")
    d.text((4, top - 16), ylabel, fill="black")
    for k, s in enumerate(series.values()):
        c = colours[k % len(colours)]
        if len(s) > 1:
            d.line([(sx(x), sy(y)) for x, y in s], fill=c, width=2)
        for x, y in s[:1] if len(s) == 1 else []:  # a single step: a dot
            d.ellipse([sx(x) - 2, sy(y) - 2, sx(x) + 2, sy(y) + 2], fill=c)
    for k, name in enumerate(series):
        c = colours[k % len(colours)]
        d.line([w - right + 14, top + 12 + 16 * k, w - right + 34, top + 12 + 16 * k], fill=c, width=2)
        d.text((w - right + 40, top + 6 + 16 * k), name, fill="black")
    im.save(path)


def draw_curves(out: Path) -> list[str]:
    """loss.png: the SFT-style runs' losses, P -> PS -> PSC on one step axis and S alone from step 0;
    reward.png and reward_PSR.png: each GRPO run's reward per step and its parts."""
    series, offset = {}, 0
    for name, label in (("P", "P"), ("PS", "S after P"), ("PSC", "C after P+S")):
        m = read_jsonl(out / name / "metrics.jsonl")
        series[f"{label} loss"] = [(offset + r["step"], r["loss"]) for r in m]
        offset += len(m)
    series["S alone loss"] = [(r["step"], r["loss"]) for r in read_jsonl(out / "S" / "metrics.jsonl")]
    line_chart(out / "loss.png", "Training loss, stages P -> S -> C (and S alone)", series, "loss")
    pngs = ["loss.png"]
    for name, png in (("PSCR", "reward.png"), ("PSR", "reward_PSR.png")):
        g = read_jsonl(out / name / "metrics.jsonl")
        r = [x["reward"] for x in g]
        rew = {"reward": [(x["step"], x["reward"]) for x in g],  # and its mean over the last 5 steps: the trend
               "reward, 5-step mean": [(x["step"], sum(r[max(0, i - 4):i + 1]) / len(r[max(0, i - 4):i + 1]))
                                       for i, x in enumerate(g)]}
        rew.update({k.replace("reward_", ""): [(x["step"], x[k]) for x in g] for k in g[0]
                    if k.startswith("reward_") and k != "reward_std"})
        line_chart(out / png, f"GRPO ({name}) mean reward per step (and its parts)", rew, "reward")
        pngs.append(png)
    return pngs


# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few steps per stage, few evaluation records (tests)")
    ap.add_argument("--nproc", type=int, default=2, help="processes per training / evaluation run (default 2)")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    cfg = QUICK if a.quick else FULL
    settings = {"seed": a.seed, "quick": a.quick, "nproc": a.nproc, "config": cfg}
    cfg_file = out / "config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()) != json.loads(json.dumps(settings)):
        raise SystemExit(f"{out} holds a run with other settings ({cfg_file}); choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(settings, indent=1))
    times_file = out / "times.json"  # seconds per step, kept across resumed runs
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    t0 = time.perf_counter()
    try:
        retrained = train_stages(out, cfg, a.seed, a.nproc, times)
        evals = evaluate_rows(out, cfg, a.nproc, times, retrained)
    finally:
        times_file.write_text(json.dumps(times, indent=1))
    rows = [table_row(out, label, name, mode, evals[label]) for label, name, mode in ROWS]
    by_label = {r["row"]: r for r in rows}
    effects = stage_effects(out, by_label)
    q = table_row(out, f"{INT8_ROW} int8", INT8_RUN, "think", evals[f"{INT8_ROW} int8"], int8=True)
    int8 = {"row": q, "delta": {c: q[c] - by_label[INT8_ROW][c] for c in RECORD_SCORES}}
    trends = {n: reward_trend(out, n) for n, stage, _ in STAGES if stage == "grpo"}
    n_eval = {f: evals[ROWS[0][0]]["tasks"][f]["n"] for f in EVAL_FILES}
    md = markdown(rows, effects, trends, n_eval, int8)
    pngs = draw_curves(out)
    (out / "results.md").write_text(f"# TinyRS demo: the ablation on the synthetic split (seed {a.seed}"
                                    f"{', --quick' if a.quick else ''})\n\n" + md)
    (out / "results.json").write_text(json.dumps({
        "rows": rows, "effects": effects, "int8": int8, "grpo_reward": trends, "n_eval": n_eval, "seed": a.seed,
        "quick": a.quick, "curves": pngs, "seconds": times}, indent=1))
    log(f"done in {time.perf_counter() - t0:.0f} s this run; {out / 'results.md'}:\n\n{md}")
    log("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
