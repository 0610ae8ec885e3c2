"""The GRPO data (stage R): prompts with a reference answer and an answer type, as train_grpo.py reads them, and
the conversion of the public VHM-RL files into that form.

Our JSONL: {"id", "image" (path relative to the file's folder or --image-root), "question", "answer",
"answer_type": "open" | "closed" | "box", "system"?}. The public TinyRS GRPO data is a `datasets` DatasetDict
(save_to_disk folder, or parquet) with `prompt` (chat messages), `image` and `solution` = [answer type code,
answer, question, base64 image]; its reward reads code "0" as open-ended (an LLM judge), "1" as closed (exact
match) and "2" as a bounding box (IoU): rewards.ANSWER_TYPES.

    python rl_data.py SRC DST        # also: python train_grpo.py convert SRC DST
"""
from __future__ import annotations

import argparse
import json
import os

import data as D
import rewards as R


def infer_answer_type(question: str, answer: str) -> str:
    """For records without one: a box answer or a {VG} question is "box", a short answer "closed", else "open"."""
    if R.parse_boxes(answer) or question.lstrip().startswith("{VG}"):
        return "box"
    return "closed" if len(answer.split()) <= 4 else "open"


def _answer_kind(value, where) -> str:
    try:
        return R.answer_kind(value)
    except ValueError as e:
        raise D.DataError(f"{where}: {e}") from None


def load_rl_records(paths, image_root=None) -> list[dict]:
    """JSONL (or a JSON list) of {"image", "question", "answer", "answer_type"?, "system"?}; image paths relative
    to image_root (default: the file's folder). An unknown answer_type stops here, before any model is loaded.
    Errors name the file and record."""
    out = []
    for path in paths:
        root = image_root or os.path.dirname(os.path.abspath(path))
        for rec, where in D.read_records(path):
            missing = [k for k in ("image", "question", "answer") if not isinstance(rec.get(k), str)]
            if missing:
                raise D.DataError(f"{where}: needs string fields image, question, answer; missing or not text: "
                                  f"{missing}")
            kind = rec.get("answer_type")
            kind = _answer_kind(kind, where) if kind is not None else infer_answer_type(rec["question"], rec["answer"])
            system = rec.get("system")
            if system is not None and not isinstance(system, str):
                raise D.DataError(f"{where}: 'system' must be text, got {type(system).__name__}")
            out.append({"id": rec.get("id", f"{os.path.basename(path)}:{len(out)}"),
                        "image": os.path.join(root, rec["image"]), "question": rec["question"],
                        "answer": rec["answer"], "answer_type": kind, "system": system, "where": where})
    if not out:
        raise D.DataError(f"no records in {paths}")
    return out


# -- convert: VHM-RL in LLaVA conversations or in the public GRPO layout (prompt, image, solution) -> our JSONL --

HUB_DATA_HINT = 'reading a datasets folder or parquet needs the `datasets` package: pip install -e ".[hub-data]"'


def _hub_module(name):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(HUB_DATA_HINT) from None


def _source_rows(src):
    """(row, where) of every record of SRC: a datasets save_to_disk folder (split "train"), parquet (a file or a
    folder of them), or a JSON list / JSONL file. Images come as stored (bytes), never decoded."""
    parquet = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".parquet")) \
        if os.path.isdir(src) else [src] if src.endswith(".parquet") else []
    if os.path.isdir(src) and not parquet:
        datasets = _hub_module("datasets")
        try:
            ds = datasets.load_from_disk(src)
        except FileNotFoundError as e:
            raise D.DataError(f"{src}: a folder, but neither a datasets save_to_disk folder nor parquet files: "
                              f"{e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise D.DataError(f"{src}: no 'train' split (splits: {list(ds)})")
            ds, src = ds["train"], f"{src} (split train)"
        if isinstance(ds.features.get("image"), datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))  # the stored bytes, not a PIL image
        for i, row in enumerate(ds):
            yield row, f"{src}: row {i}"
    elif parquet:
        pq = _hub_module("pyarrow.parquet")
        for path in parquet:
            i = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    yield row, f"{path}: row {i}"
                    i += 1
    else:
        yield from D.read_records(src)


def _text_of(message) -> str:
    c = message.get("content") if isinstance(message, dict) else None
    if isinstance(c, str):
        return c.replace(D.IMAGE_PLACEHOLDER, "").strip()
    parts = [p.get("text") for p in c or [] if isinstance(p, dict) and p.get("type", "text") == "text"]
    return " ".join(t.strip() for t in parts if isinstance(t, str) and t.strip())


def _image_source(image, src_dir, where):
    """Bytes for an embedded image, a path for a file: image as a path relative to SRC's folder, a data URL or
    base64 string, raw bytes, or a {"bytes", "path"} struct."""
    import base64
    import binascii
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if not isinstance(image, str) or not image:
        raise D.DataError(f"{where}: no image; expected a path, a data URL, base64 data or {{bytes, path}}")
    if os.path.isfile(os.path.join(src_dir, image)):
        return os.path.join(src_dir, image)
    try:
        return base64.b64decode(image.split(",", 1)[-1] if image.startswith("data:") else image, validate=True)
    except (binascii.Error, ValueError):
        raise D.DataError(f"{where}: image {image[:80]!r} is neither a file under {src_dir} nor base64 data") from None


def _image_ext(data: bytes, where) -> str:
    """File extension of the format PIL reads in `data`; unreadable bytes stop the conversion."""
    import io
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except Exception as e:
        raise D.DataError(f"{where}: embedded image is not readable: {e}") from None
    return {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())


def _public_record(row, where, src_dir, dst_dir) -> dict:
    """One public-layout row -> {id, question, answer, answer_type, system, image: bytes or a path from DST}."""
    sol = row.get("solution")
    if not isinstance(sol, (list, tuple)) or len(sol) < 2:
        raise D.DataError(f"{where}: 'solution' must be a list [answer_type, answer, question, image], got "
                          f"{str(sol)[:80]!r}")
    kind = _answer_kind(sol[0], where)
    msgs = row.get("prompt")
    msgs = [{"role": "user", "content": msgs}] if isinstance(msgs, str) else list(msgs or [])
    users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    question = (_text_of(users[-1]) if users else "") or str(sol[2] if len(sol) > 2 and sol[2] else "").strip()
    if not question:
        raise D.DataError(f"{where}: no question: no user text in 'prompt' and no solution[2]")
    system = next((_text_of(m) for m in msgs if isinstance(m, dict) and m.get("role") == "system"), None)
    image = row.get("image")
    if not image or isinstance(image, dict) and not (image.get("bytes") or image.get("path")):
        image = sol[3] if len(sol) > 3 else None  # the public reward's own base64 copy of the image
    image = _image_source(image, src_dir, where)
    return {"id": row.get("id"), "question": question, "answer": str(sol[1]).strip(), "answer_type": kind,
            "system": system, "image": image if isinstance(image, bytes) else os.path.relpath(image, dst_dir)}


def _llava_record(rec, where) -> dict:
    """One LLaVA conversation (one image, a question and an answer); the image path is kept as written."""
    msgs, images = D.conversation_messages(rec, where)
    user = [m for m in msgs if m["role"] == "user"]
    bot = [m for m in msgs if m["role"] == "assistant"]
    if not user or not bot or len(images) != 1:
        raise D.DataError(f"{where}: expected one image, a question and an answer")
    q = _text_of(user[0])
    a = _text_of(bot[0])
    kind = rec.get("answer_type", rec.get("type"))
    kind = _answer_kind(kind, where) if kind is not None else infer_answer_type(q, a)
    return {"id": rec.get("id"), "question": q, "answer": a, "answer_type": kind, "system": None, "image": images[0]}


def convert_vhm_rl(src: str, dst: str) -> dict:
    """VHM-RL (LLaVA conversations, or the public prompt/image/solution layout in any container) -> our GRPO JSONL.

    Embedded images are written, bytes unchanged, to <DST stem>_images/<index>.<ext> next to DST, and image paths
    are written relative to DST's folder (LLaVA paths stay as written, for --image-root). Writing is atomic.
    Returns {"records", "answer_types": {kind: count}, "system", "images", "unreadable_boxes"}."""
    import shutil
    from tqdm import tqdm
    src_dir = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    dst_dir = os.path.dirname(os.path.abspath(dst))
    img_name = os.path.splitext(os.path.basename(dst))[0] + "_images"
    img_dir = os.path.join(dst_dir, img_name)
    tmp, tmp_dir = f"{dst}.tmp{os.getpid()}", f"{img_dir}.tmp{os.getpid()}"
    summary = {"records": 0, "answer_types": {}, "system": 0, "images": 0, "unreadable_boxes": 0}
    os.makedirs(dst_dir, exist_ok=True)
    try:
        with open(tmp, "w") as f:
            for n, (row, where) in enumerate(tqdm(_source_rows(src), desc="convert", unit=" records")):
                r = _public_record(row, where, src_dir, dst_dir) if "solution" in row else _llava_record(row, where)
                if isinstance(r["image"], bytes):
                    name = f"{n}.{_image_ext(r['image'], where)}"
                    os.makedirs(tmp_dir, exist_ok=True)
                    with open(os.path.join(tmp_dir, name), "wb") as g:
                        g.write(r["image"])
                    r["image"] = os.path.join(img_name, name)
                    summary["images"] += 1
                # a box answer our parser cannot read would earn 0 whatever the model says
                summary["unreadable_boxes"] += r["answer_type"] == "box" and not R.parse_boxes(r["answer"])
                out = {"id": r["id"] if r["id"] is not None else n, "image": r["image"], "question": r["question"],
                       "answer": r["answer"], "answer_type": r["answer_type"]}
                if r["system"]:
                    out["system"] = r["system"]
                    summary["system"] += 1
                f.write(json.dumps(out) + "\n")
                summary["records"] += 1
                summary["answer_types"][r["answer_type"]] = summary["answer_types"].get(r["answer_type"], 0) + 1
        if os.path.isdir(tmp_dir):  # images first: the JSONL never points at files that are not there
            shutil.rmtree(img_dir, ignore_errors=True)
            os.replace(tmp_dir, img_dir)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return summary


def main(argv=None, prog="rl_data.py"):
    p = argparse.ArgumentParser(prog=prog, description=convert_vhm_rl.__doc__.split("\n")[0])
    p.add_argument("src", help="LLaVA or public-layout JSON/JSONL, a datasets save_to_disk folder, or parquet")
    p.add_argument("dst", help="GRPO JSONL to write (embedded images go to <DST stem>_images/)")
    a = p.parse_args(argv)
    s = convert_vhm_rl(a.src, a.dst)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["answer_types"].items()))
    print(f"wrote {s['records']} records to {a.dst} ({kinds}); {s['images']} embedded images written")
    print(f"{s['system']} of {s['records']} prompts carry their own system message (kept per record); the other "
          f"{s['records'] - s['system']} get --system-prompt")
    if s["unreadable_boxes"]:
        print(f"warning: {s['unreadable_boxes']} box answers hold no box in [x1, y1, x2, y2] or (x1,y1),(x2,y2) "
              "form; they can only score 0")
    return s


if __name__ == "__main__":
    main()
