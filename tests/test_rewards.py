import dataclasses
import json
import logging
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rewards as R  # noqa: E402

GOOD = "<reasoning>The runway is long and straight.</reasoning>\n<answer>{}</answer>"


# --- format and extraction -------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    (GOOD.format("airport"), 1.0),
    ("  " + GOOD.format("airport") + "\n", 1.0),
    ("<reasoning>multi\nline</reasoning><answer>a\nb</answer>", 1.0),
    ("<answer>airport</answer>", 0.0),
    ("<reasoning>x</reasoning>", 0.0),
    ("preamble " + GOOD.format("airport"), 0.0),
    (GOOD.format("airport") + " trailing", 0.0),
    ("<reasoning>x</reasoning><answer>y", 0.0),
    ("", 0.0),
])
def test_format_reward(text, want):
    assert R.format_reward(text) == want


@pytest.mark.parametrize("text, want", [
    (GOOD.format(" airport "), "airport"),
    ("<answer>first</answer> <answer>second</answer>", "second"),
    ("<reasoning>think</reasoning><answer>no closing tag", "no closing tag"),
    ("<reasoning>think about forest</reasoning> desert", "desert"),
    ("plain answer", "plain answer"),
    ("<reasoning>truncated thought about forest", ""),
    ("stray close</reasoning> river", "river"),
    ("", ""),
])
def test_extract_answer(text, want):
    assert R.extract_answer(text) == want


# --- boxes -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("[[10, 20, 30, 40]]", [[10, 20, 30, 40]]),
    ("[10,20,30,40]", [[10, 20, 30, 40]]),
    ("[ 10.5 , 20 ,30.25,40 ]", [[10.5, 20, 30.25, 40]]),
    ("[[1, 2, 3, 4], [5, 6, 7, 8]]", [[1, 2, 3, 4], [5, 6, 7, 8]]),
    ("<|box_start|>(10,20),(30,40)<|box_end|>", [[10, 20, 30, 40]]),
    ("(10, 20), (30, 40)", [[10, 20, 30, 40]]),
    ("(10,20)(30,40)", [[10, 20, 30, 40]]),
    ("[30, 40, 10, 20]", [[10, 20, 30, 40]]),                      # swapped corners
    ("(30,20),(10,40)", [[10, 20, 30, 40]]),
    ("[-5, 20, 1500, 40]", [[0, 20, 1000, 40]]),                   # clamped
    ("[" + "9" * 400 + ", 0, 1, 1]", [[1, 0, 1000, 1]]),
    ("(1,1),(2,2) then [[5, 6, 7, 8]] then <|box_start|>(9,9),(10,10)<|box_end|>",
     [[1, 1, 2, 2], [5, 6, 7, 8], [9, 9, 10, 10]]),               # order of appearance
    ("no box here", []),
    ("[1, 2, 3]", []),
    ("(1,2)", []),
])
def test_parse_boxes(text, want):
    assert R.parse_boxes(text) == [[float(v) for v in b] for b in want]


def test_iou_values():
    assert R.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert R.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert R.iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert R.iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0          # empty union
    assert R.iou([0, 0, 0, 10], [0, 0, 10, 10]) == 0.0


def test_positional_reward():
    gt = [400, 400, 500, 500]
    assert R.positional_reward(gt, gt) == 1.0
    assert R.positional_reward([0, 0, 10, 10], gt) > 0
    assert R.positional_reward([410, 400, 510, 500], gt) < 1.0
    for direction in [(1, 0), (0, 1), (1, 1), (-1, 0)]:
        start = [400 - 300 * direction[0], 400 - 300 * direction[1]]
        prev = -1.0
        for step in range(0, 200, 10):              # disjoint all the way (gap >= 100)
            x, y = start[0] + step * direction[0], start[1] + step * direction[1]
            r = R.positional_reward([x, y, x + 100, y + 100], gt)
            assert R.iou([x, y, x + 100, y + 100], gt) == 0.0
            assert 0.0 < r < 1.0 and r > prev
            prev = r
    overlapping = R.positional_reward([420, 420, 520, 520], gt)
    assert prev < overlapping < 1.0
    rng = random.Random(1)
    for _ in range(2000):
        a = sorted(rng.uniform(0, 1000) for _ in range(2)) + sorted(rng.uniform(0, 1000) for _ in range(2))
        b = sorted(rng.uniform(0, 1000) for _ in range(2)) + sorted(rng.uniform(0, 1000) for _ in range(2))
        a, b = [a[0], a[2], a[1], a[3]], [b[0], b[2], b[1], b[3]]
        assert 0.0 <= R.positional_reward(a, b) <= 1.0


def test_spatial_consistency():
    box = [0, 0, 100, 100]
    assert R.spatial_consistency([box] * 4) == 1.0
    assert R.spatial_consistency([[box], [box], [], None]) == pytest.approx(1 / 6)
    assert R.spatial_consistency(["[[0,0,100,100]]", "(0,0),(100,100)"]) == 1.0
    assert R.spatial_consistency([box, [0, 0, 50, 100]]) == pytest.approx(0.5)
    assert R.spatial_consistency([None, None]) == 0.0
    assert R.spatial_consistency([]) == 0.0


# --- normalisation and closed answers -----------------------------------------------------

@pytest.mark.parametrize("raw, want", [
    ("Yes.", "yes"), ("  YES ", "yes"), ("No", "no"), ("Yes, there is a harbour.", "yes"),
    ("No buildings", "no buildings"), ("The Airport.", "airport"), ("an   industrial   area", "industrial area"),
    ("Dense-Residential", "dense residential"), ("Two", "2"), ("(B)", "b"), ("B.", "b"), ("b", "b"),
    ("B) forest", "b"), ("Option B", "b"), ("option c: river", "c"), ("A forest", "forest"),
    ("", ""), ("...", ""),
])
def test_normalize_answer(raw, want):
    assert R.normalize_answer(raw) == want


QUESTION = "What is the main land cover?\nA. forest\nB. desert\nC. farmland\nAnswer with the letter."


@pytest.mark.parametrize("pred, answer, question, want", [
    ("Yes.", "yes", None, 1.0),
    ("no", "yes", None, 0.0),
    ("", "yes", None, 0.0),
    ("   ", "", None, 0.0),                       # empty prediction never matches
    ("B", "desert", QUESTION, 1.0),
    ("desert", "B", QUESTION, 1.0),
    ("(B) desert", "B", QUESTION, 1.0),
    ("A", "desert", QUESTION, 0.0),
    ("forest", "B", QUESTION, 0.0),
    ("B", "desert", None, 0.0),                  # no options listed: a letter is not text
    ("desert", "B. desert", None, 1.0),
    ("The answer is desert", "desert", None, 0.0),
    ("inline", "C", "Pick one: A. forest B. desert C. inline", 1.0),
])
def test_closed_accuracy(pred, answer, question, want):
    for answer_type in ("closed", "1", 1):
        for mode in R.MODES:
            got = R.accuracy_reward(GOOD.format(pred), answer, answer_type, question=question, mode=mode)
            assert got == want


def test_public_closed_rule_counts_too():
    # "The" normalises to nothing for closed_match; the public rule (strip, lower, drop '.') still matches it
    assert R.closed_match("The", "the.") == 0.0
    assert R.accuracy_reward(GOOD.format("The"), "the.", "1") == 1.0
    assert R.public_closed_match(" Yes. ", "yes") == 1.0
    assert R.public_closed_match("", ".") == 0.0 and R.public_closed_match("no", "yes") == 0.0


# --- the public answer codes (TinyRS grpo.py: 0 open, 1 closed, 2 box) ---------------------------

def test_public_codes():
    assert R.accuracy_reward(GOOD.format("Yes."), "yes", "1") == 1.0
    assert R.accuracy_reward(GOOD.format("Yes."), "yes", 1) == 1.0
    assert R.accuracy_reward(GOOD.format("[[0, 0, 95, 100]]"), "[[0, 0, 100, 100]]", "2") == pytest.approx(0.95)
    assert R.accuracy_reward(GOOD.format("[[0, 0, 95, 100]]"), "[[0, 0, 100, 100]]", 2) == pytest.approx(0.95)
    judge = FixedJudge(0.3)
    assert R.accuracy_reward(GOOD.format("A wide river."), "A river", "0", question="Q?", image="x.png",
                             judge=judge) == 0.3
    assert judge.calls == [("Q?", "A river", "A wide river.")] and judge.images == ["x.png"]
    assert R.accuracy_reward(GOOD.format("A wide river."), "A river", 0, judge=judge) == 0.3
    assert [R.answer_kind(t) for t in ("0", "1", "2", 0, 1, 2, "open", "CLOSED", " box ")] == \
           ["open", "closed", "box", "open", "closed", "box", "open", "closed", "box"]


@pytest.mark.parametrize("bad", ["7", 3, "grounding", "", None, True, "0.0"])
def test_unknown_answer_type_raises(bad):
    want = r"unknown answer type " + re.escape(repr(bad)) + r".*0, 1, 2, open, closed, box"
    with pytest.raises(ValueError, match=want):
        R.answer_kind(bad)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        R.accuracy_reward(GOOD.format("yes"), "yes", bad)
    judge = FixedJudge(1.0)
    with pytest.raises(ValueError):  # before anything is scored or sent to the judge
        R.compute_rewards([GOOD.format("x"), GOOD.format("y")], ["x", "y"], ["0", bad], judge=judge)
    assert judge.calls == []


# --- box and open accuracy, modes ----------------------------------------------------------

def test_box_accuracy_uses_ground_truth_from_answer():
    gt = "[[100, 100, 200, 200]]"
    assert R.accuracy_reward(GOOD.format("[[100, 100, 200, 200]]"), gt, "box") == 1.0
    assert R.accuracy_reward(GOOD.format("<|box_start|>(100,100),(200,200)<|box_end|>"), gt, "2") == 1.0
    off = R.accuracy_reward(GOOD.format("[[150, 100, 250, 200]]"), gt, 2)
    assert off == pytest.approx(1 / 3)
    # the public code read the ground truth from the completion, so any box scored 1
    assert R.accuracy_reward(GOOD.format("[[600, 600, 700, 700]]"), gt, "box") == 0.0
    assert R.accuracy_reward(GOOD.format("somewhere at the top"), gt, "box") == 0.0
    assert R.accuracy_reward(GOOD.format("[[100, 100, 200, 200]]"), "no box", "box") == 0.0
    # boxes in the reasoning do not count; the first box of the answer does
    text = "<reasoning>maybe [[100,100,200,200]]</reasoning><answer>[[600,600,700,700]] [[100,100,200,200]]</answer>"
    assert R.accuracy_reward(text, gt, "box") == 0.0


@pytest.mark.parametrize("score, binary_box, binary_open, quantized", [
    (0.3, 0.0, 0.0, 0.0), (0.4, 0.0, 0.0, 0.0), (0.5, 1.0, 0.0, 1 / 3), (0.55, 1.0, 0.0, 0.5),
    (0.7, 1.0, 1.0, 1.0), (0.9, 1.0, 1.0, 1.0),
])
def test_modes(score, binary_box, binary_open, quantized):
    assert R.apply_mode(score, "box", "continuous") == score
    assert R.apply_mode(score, "box", "binary") == binary_box
    assert R.apply_mode(score, "open", "binary") == binary_open
    assert R.apply_mode(score, "box", "quantized") == pytest.approx(quantized)
    assert R.apply_mode(score, "open", "quantized") == pytest.approx(quantized)
    with pytest.raises(ValueError):
        R.apply_mode(score, "box", "stepwise")


def test_modes_on_box_iou():
    gt = "[[0, 0, 100, 100]]"
    pred = GOOD.format("[[0, 0, 55, 100]]")  # IoU 0.55
    assert R.accuracy_reward(pred, gt, "box", mode="continuous") == pytest.approx(0.55)
    assert R.accuracy_reward(pred, gt, "box", mode="binary") == 1.0
    assert R.accuracy_reward(pred, gt, "box", mode="quantized") == pytest.approx(0.5)
    pred = GOOD.format("[[0, 0, 45, 100]]")  # IoU 0.45
    assert R.accuracy_reward(pred, gt, "box", mode="binary") == 0.0


class FixedJudge:
    def __init__(self, value):
        self.value, self.calls, self.images = value, [], []

    def score(self, question, answer, prediction, image=None):
        self.calls.append((question, answer, prediction))
        self.images.append(image)
        return self.value

    def score_many(self, items):
        return [self.score(*it) for it in items]


def test_open_accuracy_with_and_without_judge():
    judge = FixedJudge(0.55)
    got = R.accuracy_reward(GOOD.format("Two ships"), "2 ships", "0", question="Q?", judge=judge)
    assert got == 0.55 and judge.calls == [("Q?", "2 ships", "Two ships")]
    assert R.accuracy_reward(GOOD.format("x"), "y", "open", judge=judge, mode="quantized") == pytest.approx(0.5)
    assert R.accuracy_reward(GOOD.format("x"), "y", "open", judge=judge, mode="binary") == 0.0
    assert R.accuracy_reward(GOOD.format(""), "y", "open", judge=judge) == 0.0   # empty: not asked
    assert len(judge.calls) == 3
    # no judge: strict normalised exact match
    assert R.accuracy_reward(GOOD.format("Two ships."), "2 ships", "open") == 1.0
    assert R.accuracy_reward(GOOD.format("several ships"), "2 ships", "open") == 0.0


def test_compute_rewards_batches_open_answers():
    judge = FixedJudge(0.8)
    completions = [GOOD.format("desert"), "[[0,0,10,10]]", GOOD.format("a port"), GOOD.format(""),
                   GOOD.format("[[0,0,10,10]]")]
    answers = ["desert", "[[0,0,10,10]]", "harbour", "harbour", "[[20,0,30,10]]"]
    types = ["1", "2", "0", "0", "box"]
    out = R.compute_rewards(completions, answers, types, ["q"] * 5, names=("format", "accuracy", "positional"),
                            judge=judge, images=["a.png", "b.png", "c.png", "d.png", "e.png"])
    assert out["format"] == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert out["accuracy"] == [1.0, 1.0, 0.8, 0.0, 0.0]
    assert len(judge.calls) == 1 and judge.images == ["c.png"]   # the open answer went with its own image
    assert out["positional"][:4] == [0.0, 1.0, 0.0, 0.0] and 0.0 < out["positional"][4] < 1.0
    with pytest.raises(ValueError):
        R.compute_rewards(completions, answers, types, names=("nope",))


# --- fuzz ---------------------------------------------------------------------------------

FRAGMENTS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "<|box_start|>", "<|box_end|>",
             "[", "]", "[[", "]]", "(", ")", ",", " ", "\n", "-", ".", "yes", "No.", "A.", "(B)", "Option",
             "999999999999999999999", "0", "1000", "<", ">", "/", "answer", "\\", "*", "?"]


def _random_box(rng):
    v = [str(rng.randint(-50, 1200)) if rng.random() < 0.7 else f"{rng.uniform(-10, 2000):.2f}" for _ in range(4)]
    sp = rng.choice(["", " ", "  "])
    if rng.random() < 0.5:
        return "[" + ("," + sp).join(v) + "]"
    return f"<|box_start|>({v[0]},{sp}{v[1]}),{sp}({v[2]},{v[3]})<|box_end|>"


def _random_string(rng):
    parts = []
    for _ in range(rng.randint(0, 30)):
        r = rng.random()
        if r < 0.1:
            parts.append(_random_box(rng))
        elif r < 0.45:
            parts.append(rng.choice(FRAGMENTS))
        elif r < 0.75:
            parts.append(str(rng.randint(-50, 1200)) if rng.random() < 0.7 else f"{rng.uniform(-10, 2000):.3f}")
        else:
            parts.append("".join(chr(rng.randint(1, 0x10FFFF)) for _ in range(rng.randint(1, 5))))
    s = "".join(parts)
    if rng.random() < 0.3:  # well-formed shells around random content
        s = f"<reasoning>{s[:len(s) // 2]}</reasoning>{rng.choice(['', ' ', chr(10)])}<answer>{s[len(s) // 2:]}</answer>"
    return s


def test_fuzz_never_raises():
    rng = random.Random(1234)
    strings = [_random_string(rng) for _ in range(10_000)]
    types = ["open", "closed", "box", "0", "1", "2", 0, 1, 2, " Open "]
    gt_box = [100.0, 100.0, 300.0, 300.0]
    assert sum(bool(R.parse_boxes(s)) for s in strings) > 2000      # the fuzz reaches the parsers
    assert sum(R.format_reward(s) for s in strings) > 1000
    for i, s in enumerate(strings):
        assert R.format_reward(s) in (0.0, 1.0)
        assert isinstance(R.extract_answer(s), str)
        assert isinstance(R.normalize_answer(s), str)
        for b in R.parse_boxes(s):
            assert len(b) == 4 and all(0.0 <= v <= 1000.0 for v in b) and b[0] <= b[2] and b[1] <= b[3]
            assert 0.0 <= R.iou(b, gt_box) <= 1.0
            assert 0.0 <= R.positional_reward(b, gt_box) <= 1.0
        other = strings[i - 1]
        mode = R.MODES[i % 3]
        answer_type = types[i % len(types)]
        for answer in (other, "[[100, 100, 300, 300]]"):
            r = R.accuracy_reward(s, answer, answer_type, question=other, mode=mode)
            assert isinstance(r, float) and 0.0 <= r <= 1.0
        assert 0.0 <= R.accuracy_reward(s, other, "open", judge=FixedJudge(1.0), mode=mode) <= 1.0
        assert 0.0 <= R.spatial_consistency(strings[i:i + 4]) <= 1.0
    out = R.compute_rewards(strings, strings[::-1], [types[i % len(types)] for i in range(len(strings))],
                            strings, names=("format", "accuracy", "positional"), mode="quantized")
    for scores in out.values():
        assert len(scores) == len(strings) and all(0.0 <= v <= 1.0 for v in scores)


# --- judge against a local OpenAI-compatible server ---------------------------------------

class FakeServer:
    """POST /v1/chat/completions; `reply`, `status` and `delay` control the next answers."""

    def __init__(self):
        self.reply, self.status, self.delay = "8", 200, 0.0
        self.requests, self.auth = [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                server.requests.append(body)
                server.auth.append(self.headers.get("Authorization", ""))
                time.sleep(server.delay)
                if server.status != 200:
                    # echo the auth header, so a judge logging the error body would leak the key
                    payload = {"error": {"message": f"boom {self.headers.get('Authorization')}", "type": "server"}}
                else:
                    payload = {
                        "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                        "model": body.get("model", "m"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": server.reply}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
                    }
                data = json.dumps(payload).encode()
                try:
                    self.send_response(server.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


FAKE_KEY = "sk-test-VERYSECRET-0123456789"


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture
def judge(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    return R.Judge(model="judge-m", base_url=server.url, timeout=0.5, max_retries=0, concurrency=4)


@pytest.mark.parametrize("reply, want", [
    ("8", 0.8), ("Score: 7/10", 0.7), ("10", 1.0), ("0", 0.0), ("9.5", 0.95), ("42", 1.0), ("-3", 0.0),
])
def test_judge_parses_scores(server, judge, reply, want):
    server.reply = reply
    assert judge.score("q", "a", "p") == pytest.approx(want)
    assert judge.failures == 0
    sent = server.requests[-1]
    assert sent["model"] == "judge-m"
    assert "Candidate answer:\np" in json.dumps(sent["messages"][-1]["content"]).replace("\\n", "\n")


def test_judge_failures_score_zero(server, judge):
    server.reply = "I cannot judge this."
    assert judge.score("q", "a", "p1") == 0.0 and judge.failures == 1
    server.reply, server.status = "9", 500
    assert judge.score("q", "a", "p2") == 0.0 and judge.failures == 2
    server.status, server.delay = 200, 1.5
    t0 = time.perf_counter()
    assert judge.score("q", "a", "p3") == 0.0 and judge.failures == 3
    assert time.perf_counter() - t0 < 1.4
    server.delay = 0.0
    assert judge.score("q", "a", "p1") == pytest.approx(0.9)   # failures are not cached
    assert judge.failures == 3


def test_judge_unreachable_scores_zero(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    j = R.Judge(base_url="http://127.0.0.1:9/v1", timeout=0.5, max_retries=0)
    assert j.score("q", "a", "p") == 0.0 and j.failures == 1


def test_judge_cache_and_batch(server, judge):
    server.reply = "6"
    assert judge.score("q", "a", "p") == pytest.approx(0.6)
    assert judge.score("q", "a", "p") == pytest.approx(0.6)
    assert len(server.requests) == 1
    items = [("q", "a", "p"), ("q2", "a", "p"), ("q3", "a", "p", None), ("q2", "a", "p")] + \
            [(f"q{i}", "a", "p") for i in range(4, 12)]
    scores = judge.score_many(items)
    assert scores == [pytest.approx(0.6)] * len(items)
    assert len(server.requests) == 1 + 10            # cached and duplicate items not re-asked
    assert judge.score_many([]) == []


def test_judge_concurrent(server, judge):
    server.delay = 0.2
    t0 = time.perf_counter()
    assert judge.score_many([(f"q{i}", "a", "p") for i in range(8)]) == [pytest.approx(0.8)] * 8
    assert time.perf_counter() - t0 < 0.2 * 8 / 2      # 4 workers: about 0.4 s, serial would be 1.6 s


def test_judge_with_compute_rewards(server, judge):
    server.reply = "7"
    out = R.compute_rewards([GOOD.format("many ships"), GOOD.format("x")], ["ships", "desert"],
                            ["open", "closed"], ["q", "q"], judge=judge, mode="binary")
    assert out["accuracy"] == [1.0, 0.0] and len(server.requests) == 1


def test_judge_never_leaks_key(server, judge, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    server.status = 500
    assert judge.score("q", "a", "p") == 0.0
    server.status, server.reply = 200, "nonsense"
    assert judge.score("q", "a", "p") == 0.0
    assert server.auth and all(FAKE_KEY in a for a in server.auth)   # the key was really sent
    assert "judge failed" in caplog.text
    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err, repr(judge), str(judge),
                 json.dumps(dataclasses.asdict(judge))):
        assert FAKE_KEY not in text


# --- the judge sees the image ----------------------------------------------------------------

def _sent_image(request):
    """The decoded image of the one image_url part of a recorded judge request."""
    import base64
    import io

    from PIL import Image
    parts = [p for p in request["messages"][-1]["content"] if p.get("type") == "image_url"]
    assert len(parts) == 1
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def _close(rgb, want, tol=10):
    return all(abs(a - b) <= tol for a, b in zip(rgb, want))


def test_judge_sends_local_image_once_per_path(server, judge, tmp_path, monkeypatch):
    import data
    from PIL import Image
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (1200, 600), (200, 30, 40)).save(big)
    Image.new("RGB", (50, 40), (20, 160, 90)).save(small)
    conversions = []
    real = data.image_data_url
    monkeypatch.setattr(data, "image_data_url", lambda img, max_side=768: conversions.append(img) or
                        real(img, max_side))
    items = [("q", "a", f"p{i}", str(big)) for i in range(4)] + [("q", "a", "p0", small)]
    assert judge.score_many(items) == [pytest.approx(0.8)] * 5
    assert len(server.requests) == 5 and judge.failures == 0
    assert sorted(map(str, conversions)) == [str(big), str(small)]     # each path encoded once
    sizes = {}
    for req in server.requests:
        img = _sent_image(req)
        sizes[img.size] = img.getpixel((img.width // 2, img.height // 2))
    assert set(sizes) == {(768, 384), (50, 40)}                       # longest side bounded, aspect kept
    assert _close(sizes[(768, 384)], (200, 30, 40)) and _close(sizes[(50, 40)], (20, 160, 90))


def test_judge_image_forms(server, monkeypatch):
    from PIL import Image
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    j = R.Judge(base_url=server.url, timeout=0.5, max_retries=0, image_max_side=100)
    assert j.score("q", "a", "p", Image.new("RGB", (300, 200), (10, 20, 230))) == pytest.approx(0.8)
    img = _sent_image(server.requests[-1])
    assert img.size == (100, 67) and _close(img.getpixel((50, 33)), (10, 20, 230))
    # a different PIL image with the same texts is a different question, not a cache hit
    assert j.score("q", "a", "p", Image.new("RGB", (300, 200), (240, 240, 0))) == pytest.approx(0.8)
    assert len(server.requests) == 2 and _close(_sent_image(server.requests[-1]).getpixel((5, 5)), (240, 240, 0))
    for url in ("https://example.com/a.jpg", "data:image/png;base64,AAAA"):
        j.score("q", "a", url, url)
        assert server.requests[-1]["messages"][-1]["content"][1] == {"type": "image_url", "image_url": {"url": url}}
    j.score("q", "a", "p", None)
    assert [p["type"] for p in server.requests[-1]["messages"][-1]["content"]] == ["text"]
    n = len(server.requests)
    assert j.score("q", "a", "p", "/no/such/image.png") == 0.0      # unreadable image: a failure, nothing sent
    assert j.failures == 1 and len(server.requests) == n


def test_judge_image_cache_is_bounded(server, tmp_path, monkeypatch):
    import data
    from PIL import Image
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    j = R.Judge(base_url=server.url, timeout=0.5, max_retries=0, image_cache=1)
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for p in paths:
        Image.new("RGB", (8, 8)).save(p)
    conversions = []
    real = data.image_data_url
    monkeypatch.setattr(data, "image_data_url", lambda img, max_side=768: conversions.append(img) or
                        real(img, max_side))
    for i, p in enumerate([paths[0], paths[0], paths[1], paths[0]]):
        j.score("q", "a", f"p{i}", p)
    assert conversions == [paths[0], paths[1], paths[0]] and len(j._urls) == 1
