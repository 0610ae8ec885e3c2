"""serve.py against the real openai client, and evaluate.py --endpoint against serve.py, on a tiny random model."""
import base64
import http.client
import io
import json
import logging
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint as CK  # noqa: E402
import evaluate as E  # noqa: E402
import serve  # noqa: E402
from data import Processor  # noqa: E402

QUESTION = "What is in this aerial scene?"
KEY = "sekrit-key-4711"
TOKENS = 8


def png_bytes(w=56, h=84, seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def user(question=QUESTION, url=None):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url(png_bytes())}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def local(tiny_ckpt):
    return CK.load(tiny_ckpt[0]), Processor.from_pretrained(tiny_ckpt[0])


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "scene.png").write_bytes(png_bytes())
    return root


@pytest.fixture(scope="module")
def server(tiny_ckpt, image_root):
    srv = serve.start(tiny_ckpt[0], served_name="tiny", image_root=str(image_root), batch_window_ms=30)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def keyed(tiny_ckpt):
    srv = serve.start(tiny_ckpt[0], api_key=KEY)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def local_greedy(local, question=QUESTION, raw=None, tokens=TOKENS):
    """(text, tokens used, finish_reason, prompt tokens) of an in-process greedy generate."""
    model, proc = local
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": question}]}],
                                    add_generation_prompt=True)
    img = Image.open(io.BytesIO(raw or png_bytes()))
    b = proc(text=[text], images=[img])
    row = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"],
                         max_new_tokens=tokens, temperature=0.0)[0].tolist()
    eos = set(model.default_eos())
    n = next((i + 1 for i, t in enumerate(row) if t in eos), None)
    return proc.decode(row[:n or len(row)]), n or len(row), "stop" if n else "length", b["input_ids"].shape[1]


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_greedy_completion_equals_in_process_generate(client, local):
    text, used, reason, prompt = local_greedy(local)
    assert len(text) >= 4  # a real answer to compare, not an empty one
    r = client.chat.completions.create(model="tiny", messages=user(), temperature=0, max_tokens=TOKENS)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, used)
    assert r.usage.total_tokens == prompt + used and r.object == "chat.completion"
    assert r.model_extra["tinyrs"]["batch_size"] >= 1
    # a file inside --image-root reads the same pixels as the data URL
    r2 = client.chat.completions.create(model="tiny", messages=user(url="scene.png"), temperature=0,
                                        max_tokens=TOKENS)
    assert r2.choices[0].message.content == text


def test_stop_string_cuts_the_answer_and_streaming_agrees(client, local):
    text = local_greedy(local)[0]
    stop = text[2:4]
    r = client.chat.completions.create(model="tiny", messages=user(), temperature=0, max_tokens=TOKENS,
                                       stop=[stop, "never-there"])
    assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= local_greedy(local)[1]
    streamed = client.chat.completions.create(model="tiny", messages=user(), temperature=0, max_tokens=TOKENS,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[:text.find(stop)]


def test_streaming_yields_the_same_text(client, local):
    text, used, reason, _ = local_greedy(local)
    stream = client.chat.completions.create(model="tiny", messages=user(), temperature=0, max_tokens=TOKENS,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == text  # several pieces, joined exactly
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == used


def test_n_samples_give_n_choices_reproducible_by_seed(client):
    ask = dict(model="tiny", messages=user(), temperature=1.0, top_p=0.95, max_tokens=TOKENS, n=3, seed=7)
    r = client.chat.completions.create(**ask)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # samples of a near-flat random model differ
    assert [c.message.content for c in client.chat.completions.create(**ask).choices] == texts  # same seed
    assert 3 <= r.usage.completion_tokens <= 3 * TOKENS and r.model_extra["tinyrs"]["batch_size"] >= 1


def test_bad_image_is_a_400_and_the_next_request_succeeds(client, local):
    png = png_bytes()
    for url, says in [(data_url(b"this is no image at all"), "cannot decode the image"),
                      (data_url(png[:len(png) // 2]), "cannot decode the image"),     # truncated
                      (data_url(png_bytes(300, 1)), "aspect ratio"),
                      ("missing.png", "image file not found"),
                      ("../outside.png", "outside --image-root"),
                      ("https://example.com/x.png", "reads no URLs")]:
        with pytest.raises(openai.BadRequestError, match=says) as e:
            client.chat.completions.create(model="tiny", messages=user(url=url), temperature=0, max_tokens=2)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
        assert e.value.body["param"].startswith("messages")
    r = client.chat.completions.create(model="tiny", messages=user(), temperature=0, max_tokens=TOKENS)
    assert r.choices[0].message.content == local_greedy(local)[0]


def _get(url, path):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_concurrent_requests_are_batched_and_equal_the_single_answer(client, server, local):
    text = local_greedy(local)[0]
    before = _get(server.url, "/v1/stats")[1]["batches"]
    barrier = threading.Barrier(32)

    def ask(_):
        barrier.wait()  # all 32 leave together
        return client.chat.completions.create(model="tiny", messages=user(), temperature=0, max_tokens=TOKENS)
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert [a.choices[0].message.content for a in answers] == [text] * 32
    assert max(a.model_extra["tinyrs"]["batch_size"] for a in answers) > 1
    status, stats = _get(server.url, "/v1/stats")
    new = stats["batch_sizes"][before - stats["batches"]:] if stats["batches"] > before else []
    assert status == 200 and sum(new) == 32 and max(new) > 1 and len(new) < 32


def test_one_batch_mixes_prompts_and_lengths_and_groups_by_sampling(client, server, local, monkeypatch):
    """Requests that arrive together: the greedy ones decode as one batch (other prompts, images, max_tokens,
    each answer cut to its own), the sampled ones as another, each answer as if it had been alone."""
    monkeypatch.setattr(server.s, "batch_window_ms", 400)  # all arrive inside one window
    greedy = [("Describe the image.", 3, 1), ("How many ships are there?", 8, 2), (QUESTION, 5, 3)]
    alone = [local_greedy(local, q, png_bytes(56, 84, seed), tokens) for q, tokens, seed in greedy]
    sampled = dict(model="tiny", messages=user(), temperature=1.0, max_tokens=TOKENS, n=2, seed=11)
    barrier = threading.Barrier(5)

    def ask(i):
        barrier.wait()
        if i < 3:
            q, tokens, seed = greedy[i]
            return client.chat.completions.create(model="tiny", messages=user(q, data_url(png_bytes(56, 84, seed))),
                                                  temperature=0, max_tokens=tokens)
        return client.chat.completions.create(**sampled)
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(ask, range(5)))
    for a, (text, used, reason, prompt) in zip(answers, alone):
        assert (a.choices[0].message.content, a.choices[0].finish_reason) == (text, reason)
        assert (a.usage.completion_tokens, a.usage.prompt_tokens) == (used, prompt)
    assert [a.model_extra["tinyrs"]["batch_size"] for a in answers] == [3, 3, 3, 2, 2]
    assert len({a.usage.prompt_tokens for a in answers[:3]}) > 1  # prompts of other lengths: padded together
    monkeypatch.setattr(server.s, "batch_window_ms", 0)
    again = client.chat.completions.create(**sampled)  # the same seed alone: the same samples
    assert [c.message.content for c in again.choices] == [c.message.content for c in answers[3].choices]
    assert again.model_extra["tinyrs"]["batch_size"] == 1


def test_a_failing_batch_fails_only_its_culprit(client, server, local, monkeypatch):
    monkeypatch.setattr(server.s, "batch_window_ms", 400)
    real, proc = server.model.generate, server.proc

    def generate(input_ids, *args, **kw):  # a fault that only one prompt triggers
        if any("POISON" in proc.decode(row) for row in input_ids):
            raise RuntimeError("poisoned prompt")
        return real(input_ids, *args, **kw)
    monkeypatch.setattr(server.model, "generate", generate)
    barrier = threading.Barrier(4)

    def ask(i):
        barrier.wait()
        try:
            return client.chat.completions.create(model="tiny", messages=user("POISON" if i == 0 else QUESTION),
                                                  temperature=0, max_tokens=TOKENS)
        except openai.InternalServerError as e:
            return e
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert isinstance(answers[0], openai.InternalServerError) and "poisoned prompt" in str(answers[0])
    text = local_greedy(local)[0]
    assert [a.choices[0].message.content for a in answers[1:]] == [text] * 3
    monkeypatch.undo()
    assert client.chat.completions.create(model="tiny", messages=user(), temperature=0,
                                          max_tokens=TOKENS).choices[0].message.content == text


def test_batch_planning_and_answer_cutting(local):
    job = lambda positions, max_tokens, sampling=(0.0, 1.0, 0, 1): serve.Job(  # noqa: E731
        "", [], max_tokens, [], None, sampling, positions, positions)
    a, b, c, d = job(900, 100), job(10, 20), job(950, 74), job(10, 20, (1.0, 1.0, 0, 1))
    # a and c fit together (950 + 100 > 1024 does not, so a alone), b joins; d samples: its own batch
    batches = serve.plan_batches([a, b, c, d], max_batch=32, position_limit=1024)
    assert [[x.positions for x in bt] for bt in batches] == [[10, 900], [950], [10]]
    assert [len(bt) for bt in serve.plan_batches([job(10, 5) for _ in range(5)], 2, 1024)] == [2, 2, 1]
    proc = local[1]
    ids = proc.encode("héllo wörld 中文 ok")
    pieces = serve.token_pieces(proc, ids)
    assert "".join(pieces) == proc.decode(ids) and len(pieces) == len(ids)
    assert not any("\ufffd" in p for p in pieces)  # characters split over tokens arrive whole
    out = serve.finish(proc, ids + [proc.im_end_id, 5, 6], {proc.im_end_id}, 100, ["ld", "wör", "zz"])
    assert (out.text, out.finish_reason) == ("héllo ", "stop") and "".join(out.pieces) == "héllo "
    assert proc.decode(ids[:out.tokens]).endswith("wör") and not proc.decode(ids[:out.tokens - 1]).endswith("wör")
    out = serve.finish(proc, ids + [proc.im_end_id], {proc.im_end_id}, 100, [])
    assert (out.text, out.tokens, out.finish_reason) == (proc.decode(ids), len(ids) + 1, "stop")
    out = serve.finish(proc, ids + [proc.im_end_id], {proc.im_end_id}, 3, [])
    assert (out.tokens, out.finish_reason) == (3, "length")


def _raw(url, method, path, body=None, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, r.getheader("Content-Type"), r.read()
    conn.close()
    return out


def _malformed(image_root):
    good = {"model": "tiny", "messages": user(), "max_tokens": 2, "temperature": 0}
    png = png_bytes()
    bodies = [
        (b"{", 400, None), (b"[1, 2]", 400, None), (b'{"messages": "hi"}', 400, "messages"),
        (b"\xff\xfe\x00garbage", 400, None), (b'{"temperature": NaN, "messages": []}', 400, None),
        ({"model": "tiny"}, 400, "messages"), ({"messages": []}, 400, "messages"),
        ({**good, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({**good, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ({**good, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400,
         "messages[0].content[0]"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400,
         "messages[0].content[0]"),
        ({**good, "messages": [{"role": "user", "content": "see <|image_pad|>"}]}, 400, "messages"),
        ({**good, "messages": [{"role": "assistant", "content": user()[0]["content"]}]}, 400,
         "messages[0].content[0]"),
        ({**good, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, 400, "messages[0].tool_calls"),
        ({**good, "messages": user(url=str(image_root / "nope.png"))}, 400, "messages[0].content[0].image_url.url"),
        ({**good, "messages": user(url="file:///etc/passwd")}, 400, "messages[0].content[0].image_url.url"),
        ({**good, "messages": user(url="data:text/plain;base64,aGk=")}, 400, "messages[0].content[0].image_url.url"),
        ({**good, "messages": user(url="data:image/png;base64,@@@@")}, 400, "messages[0].content[0].image_url.url"),
        ({**good, "messages": user(url=data_url(png[:100]))}, 400, "messages[0].content[0].image_url.url"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x.png"}]}]}, 400,
         "messages[0].content[0].image_url"),
        ({**good, "temperature": -1}, 400, "temperature"), ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "top_p": 0}, 400, "top_p"), ({**good, "top_p": 1.5}, 400, "top_p"),
        ({**good, "n": 0}, 400, "n"), ({**good, "n": 1000}, 400, "n"), ({**good, "n": 1.5}, 400, "n"),
        ({**good, "n": True}, 400, "n"), ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "max_tokens": 10 ** 9}, 400, "max_tokens"), ({**good, "max_tokens": "5"}, 400, "max_tokens"),
        ({**good, "max_tokens": 1020}, 400, "max_tokens"),  # within --max-tokens-limit, past 1024 positions
        ({**good, "stop": 5}, 400, "stop"), ({**good, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**good, "stop": [""]}, 400, "stop"), ({**good, "stream": "yes"}, 400, "stream"),
        ({**good, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({**good, "seed": "x"}, 400, "seed"), ({**good, "seed": 2 ** 70}, 400, "seed"),
        ({**good, "frobnicate": 1}, 400, "frobnicate"), ({**good, "presence_penalty": 1.0}, 400, "presence_penalty"),
        ({**good, "logprobs": True}, 400, "logprobs"), ({**good, "tools": []}, 400, "tools"),
        ({**good, "model": "gpt-9"}, 404, "model"),
    ]
    cases = [("POST", "/v1/chat/completions", b, s, p) for b, s, p in bodies]
    cases += [("PUT", "/v1/chat/completions", good, 405, None), ("GET", "/v1/chat/completions", None, 405, None),
              ("DELETE", "/v1/models", None, 405, None), ("POST", "/v1/models", good, 405, None),
              ("BREW", "/v1/models", None, 405, None), ("GET", "/nope", None, 404, None),
              ("POST", "/v1/completions", good, 404, None), ("GET", "/", None, 404, None)]
    return cases


def test_malformed_requests_get_4xx_json_errors_and_the_server_keeps_serving(client, server, image_root, local):
    cases = _malformed(image_root)
    for k in range(200):
        method, path, body, status, param = cases[k % len(cases)]
        got, ctype, raw = _raw(server.url, method, path, body)
        assert got == status and ctype == "application/json", (method, path, body, got, raw[:300])
        err = json.loads(raw)["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"]
        assert param is None or err["param"] == param, (body, err)
    # headers the standard library refuses itself, and a body over the limit: JSON too
    got, ctype, raw = _raw(server.url, "POST", "/v1/chat/completions", None, {"Content-Length": str(10 ** 12)})
    assert (got, ctype) == (413, "application/json") and "over the limit" in json.loads(raw)["error"]["message"]
    got, ctype, raw = _raw(server.url, "GET", "/v1/models", None, {"X-Long": "x" * 70000})
    assert 400 <= got < 500 and ctype == "application/json"
    r = client.chat.completions.create(model="tiny", messages=user(), temperature=0, max_tokens=TOKENS)
    assert r.choices[0].message.content == local_greedy(local)[0]


def test_api_key_is_required_and_never_logged(keyed, caplog):
    caplog.set_level(logging.INFO, logger="tinyrs.serve")
    name = Path(keyed.s.served_name).name
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=name, messages=user(), temperature=0, max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    got, _, raw = _raw(keyed.url, "GET", "/v1/models")  # no Authorization header at all
    assert got == 401 and "no API key" in json.loads(raw)["error"]["message"]
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(model=name, messages=user(), temperature=0, max_tokens=2).choices
    assert [m.id for m in good.models.list().data] == [name]
    lines = [r.getMessage() for r in caplog.records]
    assert any('"POST /v1/chat/completions" 401' in ln for ln in lines)
    assert any('"POST /v1/chat/completions" 200' in ln and "batch=" in ln for ln in lines)
    assert not any(KEY in ln for ln in lines)


# --- evaluate.py --endpoint --------------------------------------------------------------------------

def _image(path, w, h, seed):
    Image.open(io.BytesIO(png_bytes(w, h, seed))).save(path)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Two benchmark files in the RSRM layout (VQA and grounding), as tests/test_evaluate.py builds them."""
    root = tmp_path_factory.mktemp("bench")
    files = {"RSVQA_LR-presence_RSVQA": [("Is there a road?", "yes", 56, 56), ("Is there water?", "no", 56, 84),
                                         ("Are there buildings?", "yes", 112, 56)],
             "VG_DOIR_RSVG_test": [("the small ship", "[4, 6, 20, 30]", 56, 56),
                                   ("the large tank", "[10, 10, 100, 50]", 112, 56),
                                   ("the bridge", "[0, 0, 200, 150]", 280, 224)]}
    for stem, recs in files.items():
        (root / stem).mkdir()
        items = []
        for i, (q, a, w, h) in enumerate(recs):
            _image(root / stem / f"{i}.png", w, h, i + 10 * len(files))
            items.append({"image": f"{i}.png", "size": [w, h], "conversations": [
                {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
        (root / f"{stem}.json").write_text(json.dumps(items))
    return root


def _lines(out, name):
    rows = [json.loads(x) for x in (Path(out) / f"{name}.jsonl").read_text().splitlines()]
    return rows[0]["meta"], rows[1:]


TIMING = ("seconds", "peak_mem_gb", "sec_per_sample", "tokens_per_sec")


def test_evaluate_endpoint_reproduces_local_metrics(tiny_ckpt, keyed, bench, tmp_path, monkeypatch, capsys):
    common = ["--data-root", str(bench), "--tasks", "LR-presence,DIOR-RSVG", "--max-new-tokens", "6"]
    assert E.main(["--model", tiny_ckpt[0], "--out", str(tmp_path / "local"), "--batch-size", "2", *common]) == 0
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    name = keyed.s.served_name
    remote = ["--endpoint", keyed.url, "--served-model", name, "--concurrency", "4", "--out", str(tmp_path / "remote"),
              *common]
    requests = keyed.engine.stats()["requests"]
    assert E.main(remote) == 0
    assert keyed.engine.stats()["requests"] == requests + 6
    ml, mr = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("local", "remote"))
    strip = lambda t: {k: v for k, v in t.items() if k not in TIMING}  # noqa: E731
    assert {n: strip(t) for n, t in ml["tasks"].items()} == {n: strip(t) for n, t in mr["tasks"].items()}
    for task in ("LR-presence", "DIOR-RSVG"):
        (meta_l, rl), (meta_r, rr) = _lines(tmp_path / "local", task), _lines(tmp_path / "remote", task)
        assert [r["pred"] for r in rl] == [r["pred"] for r in rr] and [r["index"] for r in rr] == [0, 1, 2]
        assert [r["score"] for r in rl] == [r["score"] for r in rr]
        assert (meta_r["endpoint"], meta_r["served_model"]) == (keyed.url + "/v1", name) and "model" not in meta_r
        assert meta_r["max_new_tokens"] == meta_l["max_new_tokens"] == 6
        sent = rr[0]["messages"][0]["content"]  # plain mode: no system message; the image, then the text
        assert sent[1]["text"] == {"LR-presence": "{VQA} Is there a road? ", "DIOR-RSVG": "{VG} the small ship "}[task]
        assert sent[0]["image_url"]["url"].endswith("0.png")
    assert any(r["pred"] for r in rl)  # some non-empty answers were compared
    # resumed: nothing asked again; the key appears in no output
    assert E.main(remote) == 0 and keyed.engine.stats()["requests"] == requests + 6
    for p in (tmp_path / "remote").iterdir():
        assert KEY not in p.read_text()
    assert KEY not in "".join(capsys.readouterr())
    with pytest.raises(SystemExit, match="--zoom .*local model"):
        E.main(remote + ["--zoom"])
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    with pytest.raises(SystemExit, match="401"):
        E.main(remote[:-len(common)] + ["--task-file", str(bench / "RSVQA_LR-presence_RSVQA.json"),
                                        "--task-type", "vqa", "--out", str(tmp_path / "denied")])


def test_help_and_openai_only_imported_for_endpoints():
    out = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--image-root" in out.stdout and "/v1/chat/completions" in out.stdout
    code = "import sys, evaluate, serve; print('openai' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.stdout.strip() == "False", res.stderr[-2000:]


def test_quantized_server_answers_as_the_int8_model_in_process(tiny_ckpt):
    srv = serve.start(tiny_ckpt[0], quantize="int8")
    try:
        local = CK.load(tiny_ckpt[0], quantize="int8"), Processor.from_pretrained(tiny_ckpt[0])
        assert any(m.packed is not None for m in local[0].modules() if hasattr(m, "packed"))  # really int8
        text = local_greedy(local)[0]
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model=srv.s.served_name, messages=user(), temperature=0, max_tokens=TOKENS)
        assert r.choices[0].message.content == text
    finally:
        srv.shutdown()
