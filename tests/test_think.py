"""`python think.py` against a local OpenAI-compatible server (stdlib http.server), with the real openai client.

The server's behaviour is chosen by a word in the question: ok, rate (429 once), boom (500 forever), wrong (an
answer that contradicts the original, always), flaky (wrong once, then right), slow (answers after a delay)."""
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import think

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE = (11, 7)  # prompt, completion tokens reported by every answer


class FakeOpenAI:
    def __init__(self):
        self.requests = []  # (question, status)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, headers = server.respond(body)
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, body):
        user = body["messages"][-1]["content"]
        text = next(p["text"] for p in user if p["type"] == "text")
        assert all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in user if p["type"] != "text")
        n_images = sum(p["type"] == "image_url" for p in user)
        q, a = re.fullmatch(r"Question: (.*)\nCorrect answer: (.*)", text, re.DOTALL).groups()
        with self.lock:
            seen = sum(r[0] == q for r in self.requests)
            kind = q.split()[0]
            status = 429 if kind == "rate" and seen == 0 else 500 if kind == "boom" else 200
            self.requests.append((q, status, n_images))
        if status != 200:
            return status, {"error": {"message": f"fake {status}", "type": "server_error"}}, \
                {"Retry-After": "0"} if status == 429 else {}
        if kind == "slow":
            time.sleep(0.4)
        answer = "something else entirely" if kind == "wrong" or (kind == "flaky" and seen == 0) else a
        content = (f"<reasoning>The image shows what the question asks about ({q}).</reasoning>\n"
                   f"<answer>{answer}</answer>")
        return 200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": content}}],
                     "usage": {"prompt_tokens": USAGE[0], "completion_tokens": USAGE[1],
                               "total_tokens": sum(USAGE)}}, {}

    def count(self, word, status=None):
        return sum(q.split()[0] == word and (status is None or s == status) for q, s, _ in self.requests)


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.httpd.shutdown()


def record(rid, kind, answer="forest", turns=1, image="a.png"):
    conv = []
    for t in range(turns):
        conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + f"{kind} question {rid} {t}"},
                 {"from": "gpt", "value": answer if t == 0 else f"[[1, 2, 3, {t}]]"}]
    return {"id": rid, "image": image, "conversations": conv, "task": "CLS"}


def write_data(tmp_path, recs):
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8")).save(tmp_path / "a.png")
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def think_argv(data_path, out, url, *extra):
    return ["--data", data_path, "--out", out, "--base-url", url, "--model", "fake", "--backoff", "0.01",
            "--retries", "2", "--attempts", "2", "--timeout", "10", *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_think_happy_path_retries_rejects_and_failures(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    recs = [record("ok1", "ok"), record("ok2", "ok", answer="Yes.", turns=2), record("r", "rate"),
            record("b", "boom"), record("w", "wrong"), record("f", "flaky", answer="3")]
    out = str(tmp_path / "think.jsonl")
    summary = think.main(think_argv(write_data(tmp_path, recs), out, server.url, "--concurrency", "3"))

    assert summary["done"] == 4 and summary["rejected"] == 1 and summary["failed"] == 1
    done = {r["id"]: r for r in read_jsonl(out)}
    assert set(done) == {"ok1", "ok2", "r", "f"}
    for rid, rec in done.items():
        orig = next(r for r in recs if r["id"] == rid)
        for new, old in zip(rec["conversations"], orig["conversations"]):
            if old["from"] == "gpt":  # reasoning added, the original answer kept verbatim
                m = re.fullmatch(r"<reasoning>(.+)</reasoning><answer>(.*)</answer>", new["value"], re.DOTALL)
                assert m and m.group(2) == old["value"]
            else:
                assert new == old
    assert len(done["ok2"]["conversations"]) == 4  # multi-turn: both answers rewritten
    rejected = read_jsonl(str(tmp_path / "think.rejected.jsonl"))
    assert [r["id"] for r in rejected] == ["w"] and "forest" in rejected[0]["reason"]
    assert "something else" in rejected[0]["last_output"]
    failed = read_jsonl(str(tmp_path / "think.failed.jsonl"))
    assert [r["id"] for r in failed] == ["b"] and "500" in failed[0]["reason"]
    # 429 retried once; 500 tried 1 + retries times; a disagreeing answer asked again up to --attempts
    assert server.count("rate") == 2 and server.count("rate", 429) == 1
    assert server.count("boom") == 3
    assert server.count("wrong") == 2 and server.count("flaky") == 2
    assert all(n == 1 for _, _, n in server.requests)  # the image went with every request
    answered = sum(s == 200 for _, s, _ in server.requests)
    assert summary["prompt_tokens"] == answered * USAGE[0] and summary["completion_tokens"] == answered * USAGE[1]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["total_tokens"] == answered * sum(USAGE)

    # a second run asks again only for the failed record (done and rejected ids are final)
    n_before = len(server.requests)
    again = think.main(think_argv(str(tmp_path / "in.jsonl"), out, server.url))
    assert again["skipped_done"] == 5 and again["failed"] == 1
    assert {q.split()[0] for q, _, _ in server.requests[n_before:]} == {"boom"}


def test_think_resumes_after_interruption(tmp_path, server):
    recs = [record(f"s{i}", "slow") for i in range(6)]
    path = write_data(tmp_path, recs)
    out = str(tmp_path / "think.jsonl")
    env = {**os.environ, "OPENAI_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "think.py"),
                             *think_argv(path, out, server.url, "--concurrency", "1")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not os.path.exists(out) or len(read_jsonl(out)) < 2):
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    first = [r["id"] for r in read_jsonl(out)]
    assert 2 <= len(first) < 6, "the run must be interrupted part way"
    with open(out, "a") as f:  # a line cut short by the kill
        f.write('{"id": "s5", "conversat')
    n_before = len(server.requests)

    summary = think.main(think_argv(path, out, server.url, "--concurrency", "2"))
    ids = [r["id"] for r in read_jsonl(out)]  # the half line was dropped, so the file parses
    assert sorted(ids) == [f"s{i}" for i in range(6)] and len(set(ids)) == 6
    assert summary["skipped_done"] == len(first) and summary["done"] == 6 - len(first)
    asked_again = Counter(q.split()[2] for q, _, _ in server.requests[n_before:])
    assert not set(asked_again) & set(first) and sum(asked_again.values()) == 6 - len(first)


def test_think_needs_a_key_without_base_url(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = write_data(tmp_path, [record("a", "ok")])
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        think.main(["--data", path, "--out", str(tmp_path / "o.jsonl")])


def test_help_says_what_it_is_and_openai_is_imported_only_to_run():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "think.py"), "--help"], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout
    assert "VHM-Instruct-Think" in out and "OpenAI-compatible" in out and "--base-url" in out and "--attempts" in out
    code = "import sys, think; print('openai' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    assert loaded.strip() == "False"
