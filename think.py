"""Reasoning answers for conversation data, as in VHM-Instruct-Think: an LLM behind any OpenAI-compatible
endpoint (OpenAI, vLLM, SGLang, ...) rewrites every assistant turn as
<reasoning>...</reasoning><answer>original answer</answer>.

The LLM sees the record's images, the question and the correct answer, and explains how the answer follows from
the image. An output whose answer disagrees with the original is asked again (--attempts), then rejected; a
kept record carries the dataset's answer verbatim. Requests retry on 429, 5xx, timeouts and dropped
connections (--retries, --backoff).

    OPENAI_API_KEY=... python think.py --data vhm_instruct.json --image-root images --out vhm_think.jsonl
    python think.py --data sft.json --out think.jsonl --base-url http://localhost:8000/v1 --model NAME

Writes OUT (one finished record per line, the input's fields and id), OUT's stem + .rejected.jsonl (final) and
+ .failed.jsonl (this run's transient failures), and prints a JSON summary with token counts. Resumable: the
same command again skips done and rejected ids and retries the failed ones. OUT is data for the CoT stage.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time

from data import (ROLES, DataError, _PLACEHOLDER_RE, conversation_messages, image_data_url, image_path,
                  read_records, record_turns)
from rewards import normalize_answer

THINK_PROMPT = (
    "You are given a remote sensing image, a question about it and the correct answer. Explain step by step how "
    "the answer follows from what can be seen in the image: name the relevant objects, their positions, counts, "
    "shapes and context, as an analyst looking at the image would. Reason as if you were working the answer out "
    "yourself; do not say that the answer was given to you. Write the reasoning inside <reasoning> </reasoning>, "
    "then the answer inside <answer> </answer>, copied exactly as given (boxes keep their coordinates). Output "
    "nothing else."
)
_THINK_RE = re.compile(r"\s*<reasoning>(.*?)</reasoning>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def think_pairs(record: dict, where: str) -> list[tuple[int, str, str]]:
    """(turn index, question text, original answer) for each assistant turn of a record."""
    convs = record_turns(record)
    conversation_messages(record, where)  # the same checks as training: roles, placeholders, an assistant turn
    pairs, question = [], ""
    for j, t in enumerate(convs):
        role = ROLES[str(t.get("from", t.get("role"))).lower()]
        text = t.get("value", t.get("content"))
        if role == "user":
            question = _PLACEHOLDER_RE.sub(" ", text).strip()
        elif role == "assistant":
            pairs.append((j, question, text))
    return pairs


def _call_with_retries(client, request: dict, retries: int, backoff: float):
    """client.chat.completions.create, retried with exponential backoff (or the server's Retry-After) on 429,
    5xx, timeouts and dropped connections; other errors (400, 401, ...) are final at once."""
    import openai
    for attempt in range(retries + 1):
        try:
            return client.chat.completions.create(**request)
        except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                openai.APIConnectionError) as e:
            if attempt == retries:
                raise
            delay = backoff * 2 ** attempt * (1 + random.random())
            after = getattr(getattr(e, "response", None), "headers", {}).get("retry-after")
            try:
                delay = max(delay, min(float(after), 60.0)) if after is not None else delay
            except ValueError:
                pass
            time.sleep(delay)


def think_one(client, record: dict, where: str, image_root: str, args) -> dict:
    """Rewrite every assistant turn of one record as <reasoning>...</reasoning><answer>original</answer>.

    Returns {"status": "done" | "rejected" | "failed", "record" | "reason", "usage": [prompt, completion]}."""
    usage = [0, 0]
    try:
        pairs = think_pairs(record, where)
        images = record.get("image", record.get("images")) or []
        images = [images] if isinstance(images, str) else images
        urls = [image_data_url(image_path(p, image_root, record.get("source_dataset")), args.image_max_side)
                for p in images]
    except (DataError, OSError, ValueError) as e:
        return {"status": "failed", "reason": str(e), "usage": usage}
    out = json.loads(json.dumps(record))
    for j, question, answer in pairs:
        content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        content.append({"type": "text", "text": f"Question: {question}\nCorrect answer: {answer}"})
        request = {"model": args.model, "messages": [{"role": "system", "content": THINK_PROMPT},
                                                     {"role": "user", "content": content}],
                   "temperature": args.temperature, "max_tokens": args.max_tokens}
        last = None
        for _ in range(args.attempts):
            try:
                resp = _call_with_retries(client, request, args.retries, args.backoff)
            except Exception as e:  # noqa: BLE001 - every API failure is reported per record, never raised
                return {"status": "failed", "reason": f"turn {j}: {type(e).__name__}: {e}", "usage": usage}
            if resp.usage is not None:
                usage[0] += resp.usage.prompt_tokens or 0
                usage[1] += resp.usage.completion_tokens or 0
            last = (resp.choices[0].message.content or "") if resp.choices else ""
            m = _THINK_RE.fullmatch(last)
            if m and m.group(1).strip() and normalize_answer(m.group(2)) == normalize_answer(answer):
                # the original answer verbatim: the label the model learns stays exactly the dataset's
                reasoning = m.group(1).strip()
                out["conversations"][j]["value"] = f"<reasoning>{reasoning}</reasoning><answer>{answer}</answer>"
                break
        else:
            return {"status": "rejected", "usage": usage, "last_output": last,
                    "reason": f"turn {j}: after {args.attempts} attempts the output is not <reasoning>..</reasoning>"
                              f"<answer>..</answer> with the original answer {answer!r}"}
    return {"status": "done", "record": out, "usage": usage}


def _done_ids(path) -> set:
    """Ids already written to a JSONL output; a half-written last line (from a kill) is cut off first."""
    if not os.path.isfile(path):
        return set()
    with open(path, "rb+") as f:
        data_ = f.read()
        if data_ and not data_.endswith(b"\n"):
            f.truncate(data_.rfind(b"\n") + 1)
            data_ = data_[:data_.rfind(b"\n") + 1]
    return {json.loads(line)["id"] for line in data_.decode("utf-8").splitlines() if line.strip()}


def add_think_args(p):
    p.add_argument("--data", required=True, action="append", help="conversation file (JSON list or JSONL), repeatable")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the data "
                                                      "file's folder)")
    p.add_argument("--out", required=True, help="output JSONL; OUT minus .jsonl + .rejected.jsonl / .failed.jsonl")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OpenAI's)")
    p.add_argument("--model", default="gpt-4.1-mini")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=5, help="retries of a request on 429/5xx/timeout")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry")
    p.add_argument("--attempts", type=int, default=3, help="tries per turn before an answer that disagrees "
                                                           "with the original is rejected")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--image-max-side", type=int, default=1024, help="images are sent downscaled to this side")
    p.add_argument("--limit", type=int, default=None, help="process at most this many new records")


def run_think(args) -> dict:
    """Write reasoning answers (VHM-Instruct-Think) for conversation records with an OpenAI-compatible model."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    import openai  # only this command needs it
    stem = args.out[:-len(".jsonl")] if args.out.endswith(".jsonl") else args.out
    rejected_path, failed_path = stem + ".rejected.jsonl", stem + ".failed.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # Resumable: done and rejected ids are final; failed ones (transient errors) are tried again.
    skip = _done_ids(args.out) | _done_ids(rejected_path)
    todo = []
    for path in args.data:
        root = args.image_root if args.image_root is not None else os.path.dirname(os.path.abspath(path))
        for k, (rec, where) in enumerate(read_records(path)):
            rid = rec.get("id", f"{os.path.basename(path)}:{k}")
            if rid not in skip:
                todo.append((rid, rec, where, root))
    todo = todo[:args.limit] if args.limit is not None else todo
    key = os.environ.get("OPENAI_API_KEY") or ("EMPTY" if args.base_url else None)
    if key is None:
        raise SystemExit("set OPENAI_API_KEY (or give --base-url for an endpoint that needs no key)")
    client = openai.OpenAI(base_url=args.base_url, api_key=key, timeout=args.timeout, max_retries=0)
    summary = {"skipped_done": len(skip), "done": 0, "rejected": 0, "failed": 0, "prompt_tokens": 0,
               "completion_tokens": 0}
    failed = []
    with open(args.out, "a", encoding="utf-8") as out, open(rejected_path, "a", encoding="utf-8") as rej, \
            ThreadPoolExecutor(max(1, args.concurrency)) as pool:
        futures = {pool.submit(think_one, client, rec, where, root, args): rid for rid, rec, where, root in todo}
        try:
            for fut in as_completed(futures):
                rid, res = futures[fut], fut.result()
                summary[res["status"]] += 1
                summary["prompt_tokens"] += res["usage"][0]
                summary["completion_tokens"] += res["usage"][1]
                if res["status"] == "done":
                    out.write(json.dumps({**res["record"], "id": rid}, ensure_ascii=False) + "\n")
                    out.flush()  # a whole line at a time: a kill loses at most the record in flight
                elif res["status"] == "rejected":
                    rej.write(json.dumps({"id": rid, "reason": res["reason"], "last_output": res["last_output"]},
                                         ensure_ascii=False) + "\n")
                    rej.flush()
                else:
                    failed.append({"id": rid, "reason": res["reason"]})
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            print("interrupted: finished records are saved; run the same command again to resume", file=sys.stderr)
            raise
    with open(failed_path, "w", encoding="utf-8") as f:  # this run's failures; the next run retries them
        f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in failed)
    summary["total_tokens"] = summary["prompt_tokens"] + summary["completion_tokens"]
    print(json.dumps(summary))
    for x in failed[:5]:
        print(f"failed {x['id']}: {x['reason']}", file=sys.stderr)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_think_args(ap)
    return run_think(ap.parse_args(argv))


if __name__ == "__main__":
    main()
