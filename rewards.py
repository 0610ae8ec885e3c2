"""GRPO rewards for TinyRS-R1: format, accuracy (closed / box / open) and box helpers.

Every function that looks at model output takes any string and never raises: a bad
completion must cost reward, not a training step. Boxes are [x1, y1, x2, y2] in 0..1000.
"""
from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
import re
import string
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import InitVar, dataclass, field
from itertools import combinations

log = logging.getLogger(__name__)

MODES = ("continuous", "binary", "quantized")

# VHM-RL stores the answer type as solution[0]. The public TinyRS reward (github.com/aybora/TinyRS,
# grpo/src/open_r1/grpo.py, accuracy_reward) sends "0" to the LLM judge, compares "1" as exact text
# and scores "2" by box IoU; our own files spell the names.
ANSWER_TYPES = {"0": "open", "1": "closed", "2": "box", "open": "open", "closed": "closed", "box": "box"}

_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BRACKET_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_PAIR_BOX = re.compile(r"\(" + _NUM + "," + _NUM + r"\)\s*,?\s*\(" + _NUM + "," + _NUM + r"\)")


def _text(x) -> str:
    """Completions may come as plain strings or chat messages; reduce them to text."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return _text(x.get("content", ""))
    if isinstance(x, (list, tuple)) and x:
        return _text(x[-1])
    return "" if x is None else str(x)


def format_reward(completion) -> float:
    return 1.0 if _FORMAT.fullmatch(_text(completion).strip()) else 0.0


def extract_answer(completion) -> str:
    """Text of the last <answer> (closing tag optional), else the text outside <reasoning>.

    An unclosed <reasoning> runs to the end: a truncated chain of thought names many
    candidate answers and must not be graded as the answer.
    """
    s = _text(completion)
    start = s.rfind("<answer>")
    if start >= 0:
        s = s[start + len("<answer>"):]
        end = s.find("</answer>")
        return (s if end < 0 else s[:end]).strip()
    s = re.sub(r"<reasoning>.*?</reasoning>", " ", s, flags=re.DOTALL)
    if "<reasoning>" in s:
        s = s[:s.find("<reasoning>")]
    elif "</reasoning>" in s:
        s = s[s.rfind("</reasoning>") + len("</reasoning>"):]
    return s.strip()


def parse_boxes(text, limit=1000.0) -> list[list[float]]:
    """All boxes in `text`, in order of appearance: `[x1,y1,x2,y2]` (also inside `[[...]]`)
    and Qwen's `(x1,y1),(x2,y2)` (with or without <|box_start|>/<|box_end|>).
    Corners are sorted and coordinates clamped to [0, limit] (limit None: not clamped, for pixel boxes)."""
    s = _text(text)
    found = []
    hi = float("inf") if limit is None else limit
    for pattern in (_BRACKET_BOX, _PAIR_BOX):
        for m in pattern.finditer(s):
            v = [min(max(float(g), 0.0), hi) for g in m.groups()]  # 999...9 -> inf -> limit
            found.append((m.start(), [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])]))
    return [box for _, box in sorted(found, key=lambda t: t[0])]


def _area(b) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def positional_reward(pred, gt) -> float:
    """Distance-aware box reward in [0, 1]: r = (1 + IoU - d^2 / c^2) / 2.

    d is the distance between the box centres, c the diagonal of the smallest box enclosing
    both (the DIoU penalty), so r = 1 only for equal boxes. IoU is 0 for every disjoint box,
    however far; the distance term keeps a gradient there (RSGround-R1's motivation): r is
    > 0 since d < c, and rises as the prediction moves towards the target.
    """
    if list(pred) == list(gt):
        return 1.0
    d2 = ((pred[0] + pred[2]) - (gt[0] + gt[2])) ** 2 / 4 + ((pred[1] + pred[3]) - (gt[1] + gt[3])) ** 2 / 4
    c2 = (max(pred[2], gt[2]) - min(pred[0], gt[0])) ** 2 + (max(pred[3], gt[3]) - min(pred[1], gt[1])) ** 2
    if c2 <= 0:
        return 0.0
    return min(max((1.0 + iou(pred, gt) - d2 / c2) / 2.0, 0.0), 1.0)


def _first_box(x):
    """A completion's first box from a string, a box, a list of boxes or None."""
    if isinstance(x, str):
        boxes = parse_boxes(x)
        return boxes[0] if boxes else None
    if x is None or len(x) == 0:
        return None
    if isinstance(x[0], numbers.Real):
        return list(x) if len(x) == 4 else None
    return _first_box(x[0])


def spatial_consistency(boxes_per_completion) -> float:
    """Mean IoU over all pairs of a group's first predicted boxes, in [0, 1].

    RSGround-R1's idea: a group whose rollouts agree on where the object is gives a more
    trustworthy advantage signal than one scattered over the image, so GRPO can scale a
    box group's advantages by this. A rollout without a box makes all its pairs 0.
    Groups of one score 1 if that rollout has a box, else 0.
    """
    boxes = [_first_box(b) for b in boxes_per_completion]
    if len(boxes) < 2:
        return 1.0 if boxes and boxes[0] is not None else 0.0
    pairs = [iou(a, b) if a is not None and b is not None else 0.0 for a, b in combinations(boxes, 2)]
    return sum(pairs) / len(pairs)


_OPTION_PATTERNS = [
    re.compile(r"\(([a-z])\)\s*(.*)", re.DOTALL | re.IGNORECASE),                  # (B) text
    re.compile(r"(?:option|choice)\s*:?\s*([a-z])\b[.):]?\s*(.*)", re.DOTALL | re.IGNORECASE),  # Option B
    re.compile(r"([a-z])(?:[.):]\s*(.*))?", re.DOTALL | re.IGNORECASE),            # B | B. | B) text
]
_OPTION_IN_QUESTION = re.compile(r"(?<![A-Za-z0-9])\(?([A-H])[.):]\s+")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "，。：；！？、“”‘’"})


def _normalize_text(s: str) -> str:
    s = s.lower().strip()
    # "Yes, there is a harbour." answers a yes/no question with "yes".
    m = re.match(r"(yes|no)\b\s*(?:[,.;:!]|$)", s)
    if m:
        return m.group(1)
    words = [_NUMBER_WORDS.get(w, w) for w in s.translate(_PUNCT).split() if w not in ("a", "an", "the")]
    return " ".join(words)


def _split_option(s: str):
    """(letter, normalised text after it) for option-style answers, else (None, text)."""
    s = _text(s).strip()
    for pattern in _OPTION_PATTERNS:
        m = pattern.fullmatch(s)
        if m:
            return m.group(1).lower(), _normalize_text(m.group(2) or "")
    return None, _normalize_text(s)


def normalize_answer(s) -> str:
    """Lower case, no punctuation/articles/extra spaces, number words as digits,
    "Yes." / "Yes, ..." -> "yes", and a lone option letter ("(B)", "B.", "B) text",
    "Option B") -> "b"."""
    letter, text = _split_option(s)
    return letter if letter else text


def _question_options(question) -> dict[str, str]:
    """{letter: normalised text} for options listed as "A. x", "(B) y", "C) z" in the question."""
    q = _text(question)
    marks = list(_OPTION_IN_QUESTION.finditer(q))
    options = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(q)
        body = q[m.end():end].split("\n")[0]
        options.setdefault(m.group(1).lower(), _normalize_text(body))
    return options if len(options) >= 2 else {}


def closed_match(prediction, answer, question=None) -> float:
    """1.0 if the normalised prediction matches the answer, else 0.0.

    An option letter stands for its option's text when the question lists options, so
    "B" matches "forest" given "B. forest". Letters are compared when both sides have
    one, texts otherwise; an empty prediction never matches.
    """
    options = _question_options(question) if question else {}
    by_text = {t: k for k, t in options.items() if t}
    sides = []
    for s in (prediction, answer):
        letter, text = _split_option(s)
        if letter and letter in options:
            text = text or options[letter]
        if not letter and text in by_text:
            letter = by_text[text]
        sides.append((letter, text))
    (pl, pt), (al, at) = sides
    if pl and al:
        return float(pl == al)
    return float(bool(pt) and pt == at)


def apply_mode(score: float, kind: str, mode: str = "continuous") -> float:
    """Paper Table III reward variants for a raw IoU (kind "box") or judge score ("open").

    binary: 1 at IoU >= 0.5 / judge >= 0.7; quantized: 1 at >= 0.7, linear from 0 at 0.4
    to 1 at 0.7 (the paper says "scaled"; linear is our reading), 0 below 0.4.
    """
    s = float(score)
    s = min(max(s, 0.0), 1.0) if math.isfinite(s) else 0.0
    if mode == "continuous":
        return s
    if mode == "binary":
        return float(s >= (0.5 if kind == "box" else 0.7))
    if mode == "quantized":
        return 1.0 if s >= 0.7 else max(s - 0.4, 0.0) / 0.3
    _check_mode(mode)


def _check_mode(mode):
    # a bad mode is a configuration error, not model output: fail loudly
    if mode not in MODES:
        raise ValueError(f"unknown reward mode {mode!r}; expected one of {MODES}")


def answer_kind(answer_type) -> str:
    """'open', 'closed' or 'box' for a type name or public code (0, 1, 2 or "0", "1", "2").

    Anything else raises ValueError: a mislabelled record must stop training, not grade silently."""
    kind = None if isinstance(answer_type, bool) else ANSWER_TYPES.get(str(answer_type).strip().lower())
    if kind is None:
        raise ValueError(f"unknown answer type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)} "
                         "(public codes: 0 open, 1 closed, 2 box)")
    return kind


def public_closed_match(prediction, answer) -> float:
    """The public reward's closed test: equal after strip, lower-case and removing '.'; empty never matches."""
    p, a = (_text(x).strip().lower().replace(".", "") for x in (prediction, answer))
    return float(bool(p) and p == a)


def accuracy_reward(completion, answer, answer_type, question=None, image=None, judge=None,
                    mode="continuous") -> float:
    """Task-dependent accuracy of the completion's extracted answer against `answer`.

    closed: 1 if `closed_match` or the public rule (`public_closed_match`) says equal, else 0
    (every mode). box: IoU of the first predicted box with the first box parsed from `answer`
    (never from the completion), 0 without a box.
    open: judge score in [0, 1]; without a judge, the closed-style exact match, so offline
    runs still get a (strict) signal. box and open scores then go through `apply_mode`.
    """
    _check_mode(mode)
    kind = answer_kind(answer_type)
    pred = extract_answer(completion)
    if kind == "box":
        gt, boxes = parse_boxes(answer), parse_boxes(pred)
        return apply_mode(iou(boxes[0], gt[0]), "box", mode) if gt and boxes else 0.0
    if kind == "open" and judge is not None:
        if not pred:
            return 0.0
        return apply_mode(judge.score(_text(question), _text(answer), pred, image), "open", mode)
    return max(closed_match(pred, answer, question), public_closed_match(pred, answer))


def compute_rewards(completions, answers, answer_types, questions=None, names=("format", "accuracy"),
                    judge=None, mode="continuous", images=None) -> dict[str, list[float]]:
    """{name: one reward per completion} for names among "format", "accuracy", "positional".

    Open answers go to the judge in one concurrent batch, each with its image (a path, URL or PIL
    image; see Judge). "positional" is `positional_reward` for box answers (0 without a predicted
    box) and 0 for other types. An unknown answer type raises ValueError before anything is scored.
    """
    _check_mode(mode)
    n = len(completions)
    questions = list(questions) if questions is not None else [None] * n
    images = list(images) if images is not None else [None] * n
    kinds = [answer_kind(t) for t in answer_types]
    preds = [extract_answer(c) for c in completions]
    out: dict[str, list[float]] = {}
    for name in names:
        if name == "format":
            out[name] = [format_reward(c) for c in completions]
        elif name == "accuracy":
            scores = [0.0] * n
            judged = {i for i in range(n) if kinds[i] == "open" and judge is not None}
            ask = [i for i in sorted(judged) if preds[i]]  # empty answers score 0 unasked
            if ask:
                raw = judge.score_many([(_text(questions[i]), _text(answers[i]), preds[i], images[i]) for i in ask])
                for i, s in zip(ask, raw):
                    scores[i] = apply_mode(s, "open", mode)
            for i in range(n):
                if i not in judged:
                    scores[i] = accuracy_reward(completions[i], answers[i], kinds[i], questions[i], mode=mode)
            out[name] = scores
        elif name == "positional":
            scores = []
            for i in range(n):
                gt, boxes = parse_boxes(answers[i]), parse_boxes(preds[i])
                ok = kinds[i] == "box" and gt and boxes
                scores.append(positional_reward(boxes[0], gt[0]) if ok else 0.0)
            out[name] = scores
        else:
            raise ValueError(f"unknown reward {name!r}")
    return out


JUDGE_PROMPT = (
    "You grade answers to questions about remote-sensing images (satellite or aerial photos). "
    "You are given the image when attached, the question, a reference answer and a candidate "
    "answer. Rate how well the candidate agrees with the reference in meaning: the objects, "
    "counts, attributes, positions and conclusions matter; wording, length and style do not. "
    "Extra detail that does not contradict the reference is acceptable; contradictions and "
    "invented facts lower the score. Reply with a single integer from 0 (wrong or unrelated) to "
    "10 (equivalent to the reference) and nothing else.")


@dataclass
class Judge:
    """LLM judge on any OpenAI-compatible endpoint; scores in [0, 1], failures score 0.

    The judge sees the image: an http(s) or data URL is sent as is; a local path or PIL image as a JPEG data
    URL, its longest side at most `image_max_side`, converted once per path. An unreadable image is a failure.
    The API key (argument, else env `api_key_env`) goes only into the client: it is not a
    field, so it is absent from repr() and dataclasses.asdict(), and redacted from logs.
    """
    model: str = "gpt-4.1-mini"
    base_url: str | None = None
    api_key: InitVar[str | None] = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 30.0
    max_retries: int = 2
    max_tokens: int = 8
    image_max_side: int = 768
    image_cache: int = 256  # data URLs kept (about 100 KB each), oldest dropped first
    failures: int = field(default=0, init=False)
    requests: int = field(default=0, init=False)

    def __post_init__(self, api_key):
        import openai  # lazily: only machines that run a judge need the package

        key = api_key or os.environ.get(self.api_key_env)
        if not key:
            log.warning("no judge API key in $%s; sending a placeholder", self.api_key_env)
        key = key or "EMPTY"  # local OpenAI-compatible servers usually ignore the key
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout,
                                     max_retries=self.max_retries)
        self._cache: dict = {}
        self._lock = threading.Lock()
        self._urls: dict[str, str] = {}  # local image path -> data URL
        self._url_lock = threading.Lock()  # held while converting, so threads never encode one image twice

    def _redact(self, msg: str) -> str:
        key = self._client.api_key
        return msg.replace(key, "***") if key and len(key) > 3 else msg

    def _ask(self, question, answer, prediction, image) -> float:
        text = f"Question:\n{question}\n\nReference answer:\n{answer}\n\nCandidate answer:\n{prediction}"
        content = [{"type": "text", "text": text}]
        if image is not None:
            content.append({"type": "image_url", "image_url": {"url": self._image_url(image)}})
        with self._lock:
            self.requests += 1
        reply = self._client.chat.completions.create(
            model=self.model, temperature=0.0, max_tokens=self.max_tokens,
            messages=[{"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": content}])
        m = re.search(r"-?\d+(?:\.\d+)?", reply.choices[0].message.content or "")
        if m is None:
            raise ValueError("judge reply has no number")
        return min(max(float(m.group()), 0.0), 10.0) / 10.0

    def _image_url(self, image) -> str:
        if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
            return image
        import data  # lazily: rewards stays importable without the image stack

        if not isinstance(image, (str, os.PathLike)):  # a PIL image: no name to cache it under
            return data.image_data_url(image, self.image_max_side)
        path = os.fspath(image)
        with self._url_lock:
            if path not in self._urls:
                if len(self._urls) >= self.image_cache:  # a step's images recur within it, older ones only next epoch
                    self._urls.pop(next(iter(self._urls)))
                self._urls[path] = data.image_data_url(path, self.image_max_side)
            return self._urls[path]

    def score(self, question, answer, prediction, image=None) -> float:
        key = _cache_key(question, answer, prediction, image)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            s = self._ask(question, answer, prediction, image)
        except Exception as e:  # any failure is a 0 reward, never a crashed step
            with self._lock:
                self.failures += 1
            log.warning("judge failed (%s): %s", type(e).__name__, self._redact(str(e))[:300])
            return 0.0
        with self._lock:  # failures are not cached so a transient error can recover
            self._cache[key] = s
        return s

    def score_many(self, items) -> list[float]:
        """Scores for (question, answer, prediction[, image]) items, requested concurrently."""
        items = [(tuple(it) + (None,))[:4] for it in items]
        if not items:
            return []
        unique: dict = {}
        for it in items:  # duplicates asked once
            unique.setdefault(_cache_key(*it), it)
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(unique)))) as pool:
            done = dict(zip(unique, pool.map(lambda it: self.score(*it), unique.values())))
        return [done[_cache_key(*it)] for it in items]


def _cache_key(question, answer, prediction, image=None):
    # the image changes the score: paths and URLs key by name, a PIL image by its pixels
    if image is not None and not isinstance(image, (str, os.PathLike)):
        image = (image.mode, image.size, hashlib.sha1(image.tobytes()).hexdigest())
    return (question, answer, prediction, os.fspath(image) if isinstance(image, os.PathLike) else image)
