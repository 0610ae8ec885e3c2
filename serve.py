"""Serve a Qwen2-VL / TinyRS checkpoint behind an OpenAI-compatible chat API (standard library HTTP only).

    python serve.py --model runs/R/final                      # http://127.0.0.1:8000/v1, no key
    TINYRS_API_KEY=secret python serve.py --model DIR --host 0.0.0.0 --image-root /data/scenes

GET /v1/models, GET /v1/stats (decoded batch sizes), POST /v1/chat/completions in OpenAI's format (text and
image_url parts: data URLs, or paths inside --image-root; nothing is fetched). Requests arriving within
--batch-window-ms with equal sampling settings decode as one model.generate call, n samples sharing a prompt's
cache; answers name their batch's size ("tinyrs": {"batch_size": k}); a stream sends the finished answer.
"""
from __future__ import annotations

import argparse
import base64
import collections
import hmac
import io
import itertools
import json
import logging
import math
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import torch

import checkpoint as CK
from data import IMAGE_TOKEN, Processor, load_image
from model import DTYPES, pick_dtype

log = logging.getLogger("tinyrs.serve")
DEFAULT_MAX_TOKENS = 1024  # a request that names none: room for a think-mode answer, within the limits
FIELDS = {"model", "messages", "n", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop",
          "stream", "stream_options", "seed", "user"}  # user: ignored, as it only labels the caller
NO_OPS = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}  # accepted at these values only
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """A refusal (400 unless said), answered in OpenAI's error shape."""

    def __init__(self, message: str, param=None, code=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message = status, message
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


def load_model(model_dir: str, s):
    """(model, processor) for serving; --quantize int8 quantizes the weights as they are read (CPU only)."""
    device = s.device or ("cpu" if s.quantize or not torch.cuda.is_available() else "cuda")
    proc = Processor.from_pretrained(model_dir, min_pixels=s.min_pixels, max_pixels=s.max_pixels)
    return CK.load(model_dir, dtype=pick_dtype(s.dtype, device), device=device, quantize=s.quantize), proc


# ---------------------------------------------------------------------------------------------------------
# Decoding: one worker thread owns the model; HTTP threads submit Jobs and wait on them
Output = collections.namedtuple("Output", "text tokens finish_reason pieces")  # tokens: used, stop included


@dataclass
class Job:
    text: str  # the chat text, one IMAGE_TOKEN per image
    images: list
    max_tokens: int
    stops: list
    seed: int | None
    sampling: tuple  # (temperature, top_p, top_k, n): only requests that agree on these decode together
    positions: int  # M-RoPE positions of the prompt (an image takes fewer than its tokens)
    prompt_tokens: int
    batch_size: int = 0
    result: Future = field(default_factory=Future)  # one Output per sample, or the ApiError it failed with


def token_pieces(proc, row) -> list[str]:
    """One text piece per token of `row`, joined equal to proc.decode(row). A character whose bytes span several
    tokens comes with its last token; each piece is decoded from a short window, so the cost stays linear."""
    pieces, start, read = [], 0, 0
    for k in range(1, len(row) + 1):
        prev, cur = proc.decode(row[start:read]), proc.decode(row[start:k])
        ok = not cur.endswith("\ufffd") and cur.startswith(prev)  # else an incomplete character: wait for it
        pieces.append(cur[len(prev):] if ok else "")
        start, read = (read, k) if ok else (start, read)
    full, joined = proc.decode(row), "".join(pieces)
    if full.startswith(joined) and pieces:  # bytes that never completed a character: with the last token
        pieces[-1] += full[len(joined):]
    elif full != joined:  # a tokenizer that does not decode piecewise: the whole text at the end
        pieces = [""] * (len(row) - 1) + [full]
    return pieces


def finish(proc, row, eos, max_tokens: int, stops) -> Output:
    """One generated row cut to its own max_tokens, after its first stop token, then at the first stop string."""
    row = row[:max_tokens]
    n = next((i + 1 for i, t in enumerate(row) if t in eos), None)
    row, reason = (row[:n], "stop") if n else (row, "length")
    pieces = token_pieces(proc, row)
    text = "".join(pieces)
    hits = [(text.find(s), -len(s)) for s in stops if s in text]
    if not hits:
        return Output(text, len(row), reason, pieces)
    at, neg = min(hits)  # the earliest stop string; the longest of those starting there
    ends = list(itertools.accumulate(map(len, pieces)))
    used = next(k + 1 for k, e in enumerate(ends) if e >= at - neg)  # the token that completed the stop string
    return Output(text[:at], used, "stop", [p[:max(at - e + len(p), 0)] for p, e in zip(pieces[:used], ends)])


def plan_batches(jobs, max_batch: int, position_limit: int) -> list[list[Job]]:
    """Jobs by sampling settings, in batches of at most max_batch prompts that fit the model's positions."""
    groups = {}
    for j in sorted(jobs, key=lambda j: j.positions):  # similar lengths together: less padding
        batches = groups.setdefault(j.sampling, [[]])
        cur = batches[-1] + [j]  # j joins the last batch if it fits there, else starts the next
        fits = len(cur) <= max_batch and j.positions + max(x.max_tokens for x in cur) <= position_limit
        batches[-1:] = [cur] if fits else [batches[-1], [j]]
    return [b for bs in groups.values() for b in bs if b]


class Engine:
    def __init__(self, model, proc, s):
        self.model, self.proc, self.s, self.eos = model, proc, s, set(model.default_eos())
        self.queue, self.stopping = queue.Queue(), threading.Event()
        self.sizes, self.histogram = collections.deque(maxlen=1000), collections.Counter()  # for /v1/stats
        self.thread = threading.Thread(target=self._loop, name="tinyrs-decoder", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> list:
        if self.stopping.is_set():
            raise ApiError("the server is shutting down", status=503, kind="server_error")
        self.queue.put(job)
        return job.result.result()

    def stats(self) -> dict:
        hist = dict(self.histogram)  # one copy: the worker may add a batch meanwhile
        return {"object": "tinyrs.stats", "batches": sum(hist.values()), "histogram": hist,
                "requests": sum(k * v for k, v in hist.items()), "batch_sizes": list(self.sizes)}

    def stop(self):
        self.stopping.set()
        self.thread.join()
        while not self.queue.empty():  # jobs still queued are answered, not left waiting
            self.queue.get().result.set_exception(ApiError("shutting down", status=503, kind="server_error"))

    def _loop(self):
        while not self.stopping.is_set():
            try:
                jobs = [self.queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            end = time.monotonic() + self.s.batch_window_ms / 1000  # company: jobs waiting, or arriving soon
            while len(jobs) < self.s.max_batch:
                try:
                    jobs.append(self.queue.get(timeout=max(end - time.monotonic(), 0)))
                except queue.Empty:
                    break
            for batch in plan_batches(jobs, self.s.max_batch, self.model.config.max_position_embeddings):
                self._run(batch)

    def _run(self, batch: list[Job]):
        try:
            outputs = self._decode(batch)
        except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
            log.exception("a batch of %d failed", len(batch))
            if len(batch) == 1:
                return batch[0].result.set_exception(ApiError(f"generation failed: {e!r}", status=500,
                                                              kind="server_error"))
            for j in batch:  # alone, each request fails or succeeds on its own
                self._run([j])
            return
        self.sizes.append(len(batch))
        self.histogram[len(batch)] += 1
        for j, out in zip(batch, outputs):
            j.batch_size = len(batch)
            j.result.set_result(out)

    def _decode(self, batch: list[Job]) -> list[list[Output]]:
        t, p, k, n = batch[0].sampling
        images = [im for j in batch for im in j.images]
        b = self.proc(text=[j.text for j in batch], images=images or None, padding_side="left")
        gens = None
        if t > 0:  # one generator per prompt: a seeded request samples the same whatever shares its batch
            gens = [torch.Generator(device=self.model.device).manual_seed(
                j.seed if j.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1) for j in batch]
        new = self.model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"],
                                  max_new_tokens=max(j.max_tokens for j in batch), temperature=t, top_p=p,
                                  top_k=k, num_samples=n, generator=gens).tolist()
        return [[finish(self.proc, new[i * n + g], self.eos, j.max_tokens, j.stops) for g in range(n)]
                for i, j in enumerate(batch)]


# ---------------------------------------------------------------------------------------------------------
# Requests: parsed and checked in the HTTP thread, so the worker only ever sees valid jobs
def _number(body, key, default, lo, hi, integer=False, lo_open=False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", key)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(f"'{key}' is {v}; expected a value in {'(' if lo_open else '['}{lo}, {hi}]", key)
    return v


def read_image(spec, root: str | None, where: str):
    """A decoded RGB image from an image_url: a data URL, or a path / file:// URL inside `root` (links resolved)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
        raise ApiError(f"{where} must be an object with a string 'url'", where)
    url, where = spec["url"], where + ".url"
    if not url.startswith("data:"):
        if root is None or "\x00" in url or ("://" in url and not url.startswith("file:///")):
            raise ApiError(f"{where}: the server reads no URLs, and image paths only inside --image-root; send a "
                           "data URL (data:image/png;base64,...)", where)
        source = os.path.realpath(os.path.join(root, unquote(url[7:]) if url.startswith("file://") else url))
        if os.path.commonpath([source, root]) != root:
            raise ApiError(f"{where}: image path {url!r} is outside --image-root", where, "image_outside_root")
        if not os.path.isfile(source):
            raise ApiError(f"{where}: image file not found: {url!r}", where, "image_not_found")
    else:
        head, _, payload = url.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
            raise ApiError(f"{where}: expected a data URL data:image/<type>;base64,<data>", where)
        try:
            source = io.BytesIO(base64.b64decode("".join(payload.split()), validate=True))
        except ValueError as e:  # binascii.Error is one
            raise ApiError(f"{where}: the data URL is not valid base64 ({e})", where, "invalid_image") from e
    try:
        from PIL import Image
        with Image.open(source) as im:
            im.load()  # decode now: a truncated or corrupt image fails here, as this request's error
            return load_image(im)
    except Exception as e:  # noqa: BLE001 - whatever PIL raises on hostile bytes is the request's fault
        raise ApiError(f"{where}: cannot decode the image ({type(e).__name__}: {e})", where, "invalid_image") from e


def parse_messages(messages, root: str | None) -> tuple[list, list]:
    """(messages for the chat template, images in order of appearance)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list of messages", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = json.dumps(m.get("role") if isinstance(m, dict) else m)[:40]
            raise ApiError(f"{where}.role is {role}; expected one of {', '.join(ROLES)}", where + ".role")
        if set(m) - {"role", "content", "name"}:
            extra = sorted(set(m) - {"role", "content", "name"})
            raise ApiError(f"{where}: unsupported field(s) {extra}", f"{where}.{extra[0]}")
        content = [{"type": "text", "text": m["content"]}] if isinstance(m.get("content"), str) else m.get("content")
        if not isinstance(content, list) or not content:
            raise ApiError(f"{where}.content must be a string or a non-empty list of parts", where + ".content")
        out.append({"role": m["role"], "content": []})
        for j, part in enumerate(content):
            w, kind = f"{where}.content[{j}]", part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                out[-1]["content"].append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and m["role"] == "user":
                images.append(read_image(part.get("image_url"), root, w + ".image_url"))
                out[-1]["content"].append({"type": "image"})
            else:
                raise ApiError(f"{w}: expected {{'type': 'text', 'text': str}} or (in user messages) "
                          "{'type': 'image_url', 'image_url': {'url': str}}", w)
    return out, images


def parse_options(body: dict, s) -> dict:
    """The request's scalar fields, checked."""
    for k, v in body.items():
        if k not in FIELDS and (k not in NO_OPS or v not in (None, NO_OPS[k])):
            raise ApiError(f"field '{k}' is " + (f"supported only as {json.dumps(NO_OPS[k])}" if k in NO_OPS else
                           f"unknown or unsupported; supported: {', '.join(sorted(FIELDS))}"), k)
    if body.get("model") is not None and body["model"] != s.served_name:
        raise ApiError(f"model {json.dumps(body['model'])[:80]} not found; this server serves {s.served_name!r}",
                       "model", "model_not_found", status=404)
    o = {"t": _number(body, "temperature", 1.0, 0, 2), "p": _number(body, "top_p", 1.0, 0, 1, lo_open=True),
         "k": max(_number(body, "top_k", 0, -1, 1 << 30, integer=True), 0),  # -1 (vLLM's "off") is 0 here
         "n": _number(body, "n", 1, 1, s.max_n, integer=True),
         "seed": _number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True),
         "key": "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens",
         "stream": body.get("stream") or False, "stop": body.get("stop")}
    o["max_tokens"] = _number(body, o["key"], None, 1, s.max_tokens_limit, integer=True)
    stops = [o["stop"]] if isinstance(o["stop"], str) else [] if o["stop"] is None else o["stop"]
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
        raise ApiError("'stop' must be a non-empty string or a list of at most 4 of them (as OpenAI)", "stop")
    if not isinstance(body.get("stream", False), (bool, type(None))):
        raise ApiError("'stream' must be true or false", "stream")
    opts = body.get("stream_options")
    if opts is not None and (not o["stream"] or not isinstance(opts, dict) or set(opts) - {"include_usage"}):
        raise ApiError("'stream_options' must be {\"include_usage\": bool}, with stream", "stream_options")
    return dict(o, stop=stops, include_usage=bool((opts or {}).get("include_usage")))


def parse_chat(body: dict, app) -> tuple[Job, dict]:
    """A Job and its checked options from a chat request body."""
    o = parse_options(body, app.s)
    messages, images = parse_messages(body.get("messages"), app.s.image_root)
    text = app.proc.apply_chat_template(messages, add_generation_prompt=True)
    if text.count(IMAGE_TOKEN) != len(images):  # an image token typed as text would claim features none supplies
        raise ApiError(f"message text may not hold {IMAGE_TOKEN}; send images as image_url parts", "messages")
    tokens = positions = len(app.proc.encode(text)) - len(images)  # counted without running the model
    f = app.proc.image_processor.factor
    for k, im in enumerate(images):
        try:
            h, w = app.proc.image_processor.target_size(im.height, im.width)
        except ValueError as e:  # e.g. an aspect ratio past 200
            raise ApiError(f"image {k + 1} of the request: {e}", "messages", "invalid_image") from e
        tokens += (h // f) * (w // f)
        positions += max(h // f, w // f)  # an image's rows and columns share one M-RoPE position range
    limit = app.model.config.max_position_embeddings
    max_tokens = o["max_tokens"] or min(DEFAULT_MAX_TOKENS, app.s.max_tokens_limit, limit - positions)
    if positions + max_tokens > limit or max_tokens < 1:
        raise ApiError(f"the prompt takes {positions} positions and max_tokens is {max_tokens}, past the model's limit "
                  f"of {limit}; shorten the prompt or lower max_tokens", o["key"], "context_length_exceeded")
    # greedy ignores top_p and top_k: all greedy requests batch together
    sampling = (o["t"], o["p"], o["k"], o["n"]) if o["t"] > 0 else (0.0, 1.0, 0, o["n"])
    return Job(text, images, max_tokens, o["stop"], o["seed"], sampling, positions, tokens), o


def chunks(head: dict, outs: list, tinyrs: dict, usage: dict | None):
    """OpenAI's chat.completion.chunk objects of finished answers: per choice its role, text pieces and finish."""
    def chunk(i, delta, reason=None):
        return dict(head, object="chat.completion.chunk",
                    choices=[{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}])
    for i, x in enumerate(outs):
        yield chunk(i, {"role": "assistant", "content": ""})
        yield from (chunk(i, {"content": p}) for p in x.pieces if p)
        yield dict(chunk(i, {}, x.finish_reason), tinyrs=tinyrs)
    if usage:
        yield dict(chunk(0, {}), choices=[], usage=usage)


# ---------------------------------------------------------------------------------------------------------
# HTTP
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    timeout = 120  # a client that stalls mid-request frees its thread

    def __getattr__(self, name):  # do_GET, do_POST, and any other method (a JSON 405, not a bare 501)
        if name.startswith("do_"):
            return lambda: self.route(name[3:])
        raise AttributeError(name)

    def log_request(self, code="-", size="-"):  # route logs its own line per request
        pass

    def send_error(self, code, message=None, explain=None):
        # the standard library's own refusals (a malformed request line, headers too long) answer in JSON too
        self.close_connection = True
        self.send_json(code, ApiError(message or HTTPStatus(code).phrase, status=code).body)

    def send_json(self, status: int, obj: dict | None, headers=(), ctype="application/json"):
        """A JSON answer; obj None: the headers of a stream, whose end the connection's close marks."""
        data, self.status = json.dumps(obj).encode() if obj is not None else b"", status
        self.close_connection |= obj is None
        self.send_response(status)
        for k, v in [("Content-Type", ctype), *headers, *([("Content-Length", str(len(data)))] if data else []),
                     *([("Connection", "close")] if self.close_connection else [])]:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def route(self, method: str):
        t0, path, self.note, self.status = time.monotonic(), urlsplit(self.path).path.rstrip("/"), "", 0
        try:
            if path not in ROUTES:
                raise ApiError(f"unknown path {path or '/'}; this server answers {', '.join(ROUTES)}", status=404)
            if method != ROUTES[path][0]:
                raise ApiError(f"{method} is not allowed on {path}; use {ROUTES[path][0]}", status=405)
            key, got = self.server.s.api_key, self.headers.get("Authorization", "")
            if key and not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), key.encode())):
                raise ApiError("wrong API key" if got else "no API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", status=401)
            if self.server.engine.stopping.is_set():
                raise ApiError("the server is shutting down", status=503, kind="server_error")
            ROUTES[path][1](self, self.server)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection, self.note = True, " (the client went away)"
        except Exception as e:  # noqa: BLE001 - every failure is answered, and the server goes on serving
            if not isinstance(e, ApiError):
                log.exception("error handling %s %s", method, path)
                e = ApiError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error")
            self.close_connection, self.note = True, f" {e.message[:120]!r}"  # a body may be left unread
            self.send_json(e.status, e.body, [("Allow", ROUTES[path][0])] if e.status == 405 else [])
        finally:  # the path only: a query string could carry a secret
            log.info('%s "%s %s" %s %.0fms%s', self.client_address[0], method, path or "/", self.status,
                     1000 * (time.monotonic() - t0), self.note)

    def read_json(self, limit: int) -> dict:
        size = self.headers.get("Content-Length", "").strip()
        if not size.isdigit() or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError("send the body with a Content-Length (chunked bodies are not supported)", status=411)
        if int(size) > limit:
            raise ApiError(f"request body of {size} bytes is over the limit of {limit} (--max-body-mb)", status=413)
        try:
            obj = json.loads(self.rfile.read(int(size)))
        except (ValueError, RecursionError) as e:
            raise ApiError(f"request body is not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ApiError(f"request body must be a JSON object, got {type(obj).__name__}")
        return obj


def chat(h: Handler, app):
    job, o = parse_chat(h.read_json(int(app.s.max_body_mb * 2 ** 20)), app)
    outs = app.engine.submit(job)
    used, tinyrs = sum(x.tokens for x in outs), {"batch_size": job.batch_size}
    head = {"id": f"chatcmpl-{os.urandom(12).hex()}", "created": int(time.time()), "model": app.s.served_name}
    usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": used, "total_tokens": job.prompt_tokens + used}
    h.note = f" batch={job.batch_size} n={len(outs)} prompt={job.prompt_tokens} completion={used}"
    if not o["stream"]:
        return h.send_json(200, dict(head, object="chat.completion", usage=usage, tinyrs=tinyrs, choices=[
            {"index": i, "message": {"role": "assistant", "content": x.text}, "logprobs": None,
             "finish_reason": x.finish_reason} for i, x in enumerate(outs)]))
    h.send_json(200, None, [("Cache-Control", "no-cache")], "text/event-stream")
    for c in chunks(head, outs, tinyrs, usage if o["include_usage"] else None):
        h.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
    h.wfile.write(b"data: [DONE]\n\n")


ROUTES = {"/v1/chat/completions": ("POST", chat),
          "/v1/models": ("GET", lambda h, app: h.send_json(200, {"object": "list", "data": [{
              "id": app.s.served_name, "object": "model", "created": app.created, "owned_by": "tinyrs",
              "max_model_len": app.model.config.max_position_embeddings}]})),
          "/v1/stats": ("GET", lambda h, app: h.send_json(200, app.engine.stats()))}


class Server(ThreadingHTTPServer):
    """A running server; start() gives it its settings `s`, model, proc, engine, thread and url (no /v1)."""
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connections when many clients arrive at once

    def shutdown(self):  # the HTTP loop, its socket, then the decoding worker
        super().shutdown()
        self.server_close()
        self.engine.stop()
        # A kept-alive connection's thread still holds this server; were the model freed there, at interpreter exit,
        # torch would free tensors in a thread Python is tearing down (an abort). The caller's thread frees it.
        self.model = self.engine.model = None


def start(model_dir: str, port: int = 0, **settings) -> Server:
    """Load the model and serve it from a background thread (port 0: any free port): for tests and embedding.
    `settings`: the command line's options (api_key=..., image_root=..., max_batch=...)."""
    s = parser().parse_args(["--model", str(model_dir), "--port", str(port)])
    if set(settings) - set(vars(s)):  # a misspelt setting would otherwise be ignored
        raise TypeError(f"unknown setting(s) {sorted(set(settings) - set(vars(s)))}; expected among {sorted(vars(s))}")
    vars(s).update(settings)
    s.served_name = s.served_name or os.path.basename(os.path.normpath(model_dir))
    s.image_root = os.path.realpath(s.image_root) if s.image_root else None
    model, proc = load_model(model_dir, s)
    server = Server((s.host, s.port), Handler)
    server.s, server.model, server.proc, server.created = s, model, proc, int(time.time())
    server.engine, server.url = Engine(model, proc, s), "http://%s:%d" % server.server_address[:2]
    server.thread = threading.Thread(target=server.serve_forever, name="tinyrs-http", daemon=True)
    server.thread.start()
    return server


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder or hub id")
    ap.add_argument("--served-name", default=None, help="the model id clients name (default: the folder's name)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("TINYRS_API_KEY"), help="require 'Authorization: Bearer "
                    "KEY' (default: $TINYRS_API_KEY, safer than this flag, which the process list shows)")
    ap.add_argument("--image-root", default=None, help="allow image paths / file:// URLs inside this folder")
    ap.add_argument("--max-batch", type=int, default=32, help="most prompts decoded in one batch")
    ap.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch waits for company")
    ap.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    ap.add_argument("--max-n", type=int, default=16, help="largest n (samples per request)")
    ap.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (images inline)")
    ap.add_argument("--min-pixels", type=int, default=None, help="override the processor's min_pixels")
    ap.add_argument("--max-pixels", type=int, default=None, help="override the processor's max_pixels")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --quantize), else cpu")
    ap.add_argument("--quantize", choices=["int8"], default=None, help="int8 weights per output channel for CPU "
                    "decoding (x86 kernels): ~1/4 the weight bytes per token of fp32")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = start(a.model, **{k: v for k, v in vars(a).items() if k != "model"})
    if not a.api_key and a.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who reaches it can use it", a.host)
    log.info("serving %s at %s/v1 (key %s; Ctrl-C stops)", server.s.served_name, server.url, bool(a.api_key))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a service manager's stop: as Ctrl-C
    try:
        server.thread.join()
    except KeyboardInterrupt:
        log.info("shutting down")
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
