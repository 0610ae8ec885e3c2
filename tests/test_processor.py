"""data.py's image processor, chat template and Processor against transformers (the oracle, tests only)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import QWEN2VL_CHAT_TEMPLATE, build_tokenizer, write_tokenizer_files

SMALL_MAX = 28 * 28 * 64


def oracle_image_processor(min_pixels=56 * 56, max_pixels=SMALL_MAX):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def rand_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    # A smooth gradient plus noise: bicubic overshoot and clipping both get exercised.
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 255 // max(h - 1, 1) + xx * 255 // max(w - 1, 1)) // 2
    arr = np.clip(base[..., None] + rng.integers(-60, 60, (h, w, 4)), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(arr, "RGBA")
    if mode == "LA":
        return Image.fromarray(arr[..., :2].copy(), "LA")
    if mode == "L":
        return Image.fromarray(arr[..., 0].copy(), "L")
    if mode == "P":  # palette image with a transparent index
        img = Image.fromarray(arr[..., :3].copy(), "RGB").convert("P")
        img.info["transparency"] = 0
        return img
    return Image.fromarray(arr[..., :3].copy(), "RGB")


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("proc"))
    write_tokenizer_files(build_tokenizer(), path, max_pixels=SMALL_MAX)
    return path


@pytest.fixture(scope="module")
def proc(proc_dir):
    return data.Processor.from_pretrained(proc_dir)


@pytest.fixture(scope="module")
def oracle_tok(proc_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(proc_dir)


@pytest.fixture(scope="module")
def oracle_proc(oracle_tok):
    from transformers import Qwen2VLProcessor

    # The processor's type check looks up the video processor base class, which needs torchvision (absent
    # here); we pass no video processor, so skipping that one check leaves the image/text path unchanged.
    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    return ImageOnlyQwen2VLProcessor(image_processor=oracle_image_processor(), tokenizer=oracle_tok,
                                     video_processor=None, chat_template=QWEN2VL_CHAT_TEMPLATE)


# ---------------------------------------------------------------- smart_resize

def test_smart_resize_matches_oracle_on_grid():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as oracle
    sides = [1, 2, 13, 14, 27, 28, 29, 41, 42, 55, 56, 57, 70, 99, 100, 111, 140, 224, 333, 420, 500, 517,
             700, 999, 1000, 1024, 1500, 2048, 3001, 4000, 5000]
    limits = [(56 * 56, 28 * 28 * 1280), (56 * 56, SMALL_MAX), (512 * 28 * 28, 1280 * 28 * 28), (3136, 12845056)]
    n = 0
    for lo, hi in limits:
        for h in sides:
            for w in sides:
                if max(h, w) / min(h, w) > 200:
                    continue
                got = data.smart_resize(h, w, 28, lo, hi)
                assert got == oracle(h, w, 28, lo, hi), (h, w, lo, hi)
                assert got[0] % 28 == 0 and got[1] % 28 == 0
                n += 1
    assert n > 3000


def test_smart_resize_errors():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as oracle
    for h, w in [(1, 201), (1000, 4)]:
        with pytest.raises(ValueError):
            oracle(h, w)
        with pytest.raises(ValueError, match="aspect ratio"):
            data.smart_resize(h, w)
    # The oracle dies with ZeroDivisionError on an empty image; we say what is wrong.
    for h, w in [(0, 10), (10, 0)]:
        with pytest.raises(ValueError, match="zero size"):
            data.smart_resize(h, w)
    with pytest.raises(ValueError, match="zero size"):
        data.ImageProcessor()([Image.new("RGB", (0, 10))])


# ---------------------------------------------------------------- image processor

@pytest.mark.parametrize("h,w,mode", [
    (10, 10, "RGB"),      # far below min_pixels: scaled up
    (56, 56, "RGB"),      # exactly min size
    (100, 130, "RGB"),    # rounded to nearest multiple
    (333, 517, "RGB"),    # above max_pixels: scaled down
    (30, 400, "RGB"),     # 1:13 wide
    (600, 40, "RGB"),     # 15:1 tall
    (57, 29, "RGB"),      # odd sizes
    (3, 500, "RGB"),      # ~1:167, still allowed
    (121, 77, "RGBA"),    # alpha composited on white
    (90, 61, "LA"),
    (45, 150, "L"),
    (70, 70, "P"),        # palette with a transparent index
])
def test_image_processor_matches_oracle(h, w, mode):
    img = rand_image(h, w, mode, seed=h * 1000 + w)
    pv, grid = data.ImageProcessor(max_pixels=SMALL_MAX)([img])
    # The oracle gets our RGB copy: how transformers treats alpha changed between versions (5.17 drops it, 5.23
    # composites on white); the alpha rule has its own test below, against Qwen's public one.
    ref = oracle_image_processor()(images=[data.to_rgb(img)], return_tensors="pt")
    assert grid.dtype == torch.long and torch.equal(grid, ref["image_grid_thw"])
    assert pv.dtype == torch.float32 and pv.shape == ref["pixel_values"].shape
    assert pv.shape == (int(grid.prod()), 3 * 2 * 14 * 14)
    assert torch.equal(pv, ref["pixel_values"])


def test_image_processor_real_defaults():
    img = rand_image(1000, 700, seed=3)
    ip = data.ImageProcessor()
    assert (ip.min_pixels, ip.max_pixels) == (56 * 56, 28 * 28 * 1280)
    pv, grid = ip([img])
    ref = oracle_image_processor(56 * 56, 28 * 28 * 1280)(images=[img], return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"]) and grid.tolist() == [[1, 72, 50]]
    assert torch.equal(pv, ref["pixel_values"])


def test_image_processor_several_images_and_paths(tmp_path):
    imgs = [rand_image(100, 130, seed=1), rand_image(30, 400, "RGBA", seed=2), rand_image(333, 517, "L", seed=3)]
    path = tmp_path / "third.png"
    imgs[2].save(path)
    pv, grid = data.ImageProcessor(max_pixels=SMALL_MAX)([imgs[0], imgs[1], str(path)])
    ref = oracle_image_processor()(images=[data.to_rgb(i) for i in imgs], return_tensors="pt")  # RGB: see above
    assert torch.equal(grid, ref["image_grid_thw"]) and grid.shape == (3, 3)
    assert torch.equal(pv, ref["pixel_values"])


def test_patch_layout_groups_each_2x2_merge_block():
    # A constant-per-patch image shows the order: patch (r, c) of a 4x4 grid carries value r*4+c.
    ip = data.ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    arr = np.zeros((56, 56, 3), np.uint8)
    for r in range(4):
        for c in range(4):
            arr[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = r * 4 + c
    pv, grid = ip([Image.fromarray(arr)])
    assert grid.tolist() == [[1, 4, 4]]
    order = (pv[:, 0] * 255).round().long().tolist()
    assert order == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert torch.equal(pv.view(16, 3, 2, 14, 14)[:, :, 0], pv.view(16, 3, 2, 14, 14)[:, :, 1])  # 2 equal frames


def test_image_processor_config_layouts():
    old = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
           "image_mean": list(data.CLIP_MEAN), "image_std": list(data.CLIP_STD)}
    new = {"size": {"shortest_edge": 4000, "longest_edge": 50000}, "patch_size": 14}
    a, b = data.ImageProcessor.from_dict(old), data.ImageProcessor.from_dict(new)
    assert (a.min_pixels, a.max_pixels) == (3136, 12845056)
    assert (b.min_pixels, b.max_pixels) == (4000, 50000)
    assert data.ImageProcessor.from_dict(None) == data.ImageProcessor()
    assert data.ImageProcessor.from_dict(b.to_dict()) == b
    # The oracle reads our written dict to the same limits.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    cfg = {k: v for k, v in b.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    o = Qwen2VLImageProcessorPil(**cfg)
    assert (o.size["shortest_edge"], o.size["longest_edge"]) == (4000, 50000)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_composited_on_white_as_qwen_vl_utils(mode):
    # Qwen's own image loader (QwenLM/Qwen2-VL, qwen-vl-utils/src/qwen_vl_utils/vision_process.py, to_rgb) pastes an
    # RGBA image onto white through its alpha; we do the same for every mode that carries transparency (LA, a
    # palette with a transparent index), which that loader would convert without it.
    img = rand_image(90, 61, mode, seed=4)
    rgba = img.convert("RGBA")
    public = Image.new("RGB", img.size, (255, 255, 255))
    public.paste(rgba, mask=rgba.split()[3])
    ours = data.to_rgb(img)
    assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(public))
    assert not np.array_equal(np.asarray(ours), np.asarray(img.convert("RGB")))  # the alpha did matter
    pv, _ = data.ImageProcessor(max_pixels=SMALL_MAX)([img])
    assert torch.equal(pv, data.ImageProcessor(max_pixels=SMALL_MAX)([public])[0])


def test_load_image_rgb_and_errors(tmp_path):
    rgba = rand_image(20, 30, "RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent pixel -> white
    p = tmp_path / "a.png"
    rgba.save(p)
    img = data.load_image(str(p))
    assert img.mode == "RGB" and img.size == (30, 20) and img.getpixel((0, 0)) == (255, 255, 255)
    assert np.array_equal(np.asarray(img), np.asarray(data.load_image(rgba)))
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        data.load_image(missing)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match="corrupt.png"):
        data.load_image(bad)
    with pytest.raises(ValueError, match="corrupt.png"):
        data.ImageProcessor()([str(bad)])


# ---------------------------------------------------------------- chat template

IMG, TXT = {"type": "image"}, (lambda s: {"type": "text", "text": s})
CONVERSATIONS = [
    [{"role": "user", "content": "What is this?"}],
    [{"role": "user", "content": [IMG, TXT("{CLS} Classify the scene.")]}],
    [{"role": "system", "content": "You are a remote sensing expert."},
     {"role": "user", "content": [IMG, TXT("Describe it.")]}],
    [{"role": "user", "content": [TXT("Compare "), IMG, TXT(" and "), {"type": "image", "image": "x.png"}]}],
    [{"role": "user", "content": [IMG, TXT("{VQA} Is there a building?")]},
     {"role": "assistant", "content": "yes"},
     {"role": "user", "content": [TXT("{VG} Locate the plane.")]},
     {"role": "assistant", "content": [TXT("[[120, 340, 560, 780]]")]}],
    [{"role": "system", "content": [TXT("Sys as parts.")]},
     {"role": "user", "content": "plain\nmulti-line question"}],
]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_oracle(proc, oracle_tok, conv, gen):
    msgs = CONVERSATIONS[conv]
    ours = proc.apply_chat_template(msgs, add_generation_prompt=gen)
    ref = oracle_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                         chat_template=QWEN2VL_CHAT_TEMPLATE)
    assert ours == ref
    assert proc.encode(ours) == oracle_tok.encode(ref, add_special_tokens=False)
    assert ours.endswith("<|im_start|>assistant\n") == gen


def test_chat_template_system_prompt_and_vision_ids(proc, oracle_tok):
    sys_text = "A conversation between User and Assistant. <reasoning> </reasoning><answer> </answer>"
    user = {"role": "user", "content": [IMG, TXT("Q?")]}
    ours = proc.apply_chat_template([user], add_generation_prompt=True, system_prompt=sys_text)
    ref = oracle_tok.apply_chat_template([{"role": "system", "content": sys_text}, user], tokenize=False,
                                         add_generation_prompt=True, chat_template=QWEN2VL_CHAT_TEMPLATE)
    assert ours == ref and "helpful assistant" not in ours
    explicit = [{"role": "system", "content": "Explicit."}, user]
    assert proc.apply_chat_template(explicit, system_prompt=sys_text).startswith(
        "<|im_start|>system\nExplicit.<|im_end|>\n")
    two = [{"role": "user", "content": [IMG, IMG, TXT("diff?")]}]
    assert proc.apply_chat_template(two, add_vision_id=True) == oracle_tok.apply_chat_template(
        two, tokenize=False, add_vision_id=True, chat_template=QWEN2VL_CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="video"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


# ---------------------------------------------------------------- processor call

def test_processor_call_matches_oracle_left_and_right(proc, oracle_proc):
    a = proc.apply_chat_template([{"role": "user", "content": [IMG, TXT("{CLS} Classify.")]}],
                                 add_generation_prompt=True)
    b = proc.apply_chat_template([{"role": "user", "content": [IMG, TXT("Compare with"), IMG,
                                                                TXT("and say where the harbour is.")]}],
                                 add_generation_prompt=True)
    imgs = [rand_image(100, 130, seed=5), rand_image(30, 400, seed=6), rand_image(600, 40, "RGBA", seed=7)]
    for side in ("left", "right"):
        ours = proc([a, b], images=imgs, padding_side=side)
        ref = oracle_proc(text=[a, b], images=[data.to_rgb(i) for i in imgs], padding=True, padding_side=side,
                          return_tensors="pt")
        for k in ("input_ids", "attention_mask", "image_grid_thw", "pixel_values"):
            assert torch.equal(ours[k], ref[k]), (side, k)
        mask = ours["attention_mask"]
        assert mask.sum(1).tolist() != [mask.shape[1]] * 2  # the two prompts really differ in length
        pad_col = 0 if side == "left" else -1
        assert ours["input_ids"][mask[:, pad_col] == 0, pad_col].eq(proc.pad_id).all()
    n_tok = (ours["image_grid_thw"].prod(1) // 4).sum()
    assert (ours["input_ids"] == proc.image_token_id).sum() == n_tok


def test_processor_text_only_and_types(proc, oracle_tok):
    texts = ["<|im_start|>user\nhello<|im_end|>\n", "short"]
    out = proc(texts, padding_side="right")
    assert out["pixel_values"] is None and out["image_grid_thw"] is None
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
    ref = oracle_tok(texts, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
    assert torch.equal(out["input_ids"], ref["input_ids"]) and torch.equal(out["attention_mask"], ref["attention_mask"])
    single = proc("short", return_tensors=None)
    assert single["input_ids"] == [oracle_tok.encode("short", add_special_tokens=False)]


def test_processor_image_count_mismatch(proc):
    t = "<|vision_start|><|image_pad|><|vision_end|>x"
    img = rand_image(56, 56)
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> tokens but 1 images"):
        proc([t, t], images=[img])
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> tokens but 2 images"):
        proc([t], images=[img, img])
    with pytest.raises(ValueError, match="but 0 images"):
        proc([t])
    with pytest.raises(FileNotFoundError, match="missing_tile.tif"):
        proc([t], images=["/nonexistent/missing_tile.tif"])


def test_decode_matches_oracle(proc, oracle_tok):
    text = proc.apply_chat_template([{"role": "user", "content": "Locate the 3 ships."},
                                     {"role": "assistant", "content": "[[120, 340, 560, 780]]"}])
    ids = proc.encode(text)
    for skip in (True, False):
        assert proc.decode(ids, skip) == oracle_tok.decode(ids, skip_special_tokens=skip)
    assert proc.decode(torch.tensor(ids), skip_special_tokens=False) == text
    batch = proc([text, "short text"], padding_side="left")["input_ids"]
    assert proc.batch_decode(batch) == oracle_tok.batch_decode(batch, skip_special_tokens=True)
    assert proc.batch_decode(batch)[1] == "short text"


# ---------------------------------------------------------------- loading and saving

def test_special_token_ids(proc, oracle_tok):
    for attr, name in [("image_token_id", "<|image_pad|>"), ("vision_start_id", "<|vision_start|>"),
                       ("vision_end_id", "<|vision_end|>"), ("im_start_id", "<|im_start|>"),
                       ("im_end_id", "<|im_end|>"), ("pad_id", "<|endoftext|>")]:
        assert getattr(proc, attr) == oracle_tok.convert_tokens_to_ids(name)
    assert proc.pad_id == oracle_tok.pad_token_id and proc.eos_id == oracle_tok.eos_token_id
    assert proc.default_system == "You are a helpful assistant."


def test_from_pretrained_checkpoint_folder(tiny_ckpt):
    path, _ = tiny_ckpt
    p = data.Processor.from_pretrained(path, min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 16)
    assert (p.image_processor.min_pixels, p.image_processor.max_pixels) == (28 * 28 * 8, 28 * 28 * 16)
    assert p.chat_template == QWEN2VL_CHAT_TEMPLATE
    assert data.Processor.from_pretrained(path).image_processor.max_pixels == SMALL_MAX


def test_from_pretrained_errors_and_hub(tmp_path, monkeypatch, proc_dir):
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_ckpt"):
        data.Processor.from_pretrained(str(empty))
    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return proc_dir

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    data.Processor.from_pretrained(proc_dir)
    assert calls == []  # an existing folder never touches the hub
    p = data.Processor.from_pretrained("someone/tinyrs-r1")
    assert calls[0][0] == "someone/tinyrs-r1"
    assert {"tokenizer.json", "preprocessor_config.json", "tokenizer_config.json"} <= set(calls[0][1])
    assert "model.safetensors" not in calls[0][1] and p.image_processor.max_pixels == SMALL_MAX

    def failing(repo_id, **kw):
        raise RuntimeError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(OSError, match="no/such-repo"):
        data.Processor.from_pretrained("no/such-repo")


def test_save_pretrained_round_trip(proc_dir, tmp_path, oracle_tok):
    p = data.Processor.from_pretrained(proc_dir, max_pixels=28 * 28 * 32)
    out = tmp_path / "saved"
    p.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == open(os.path.join(proc_dir, name), "rb").read()
    pp = json.loads((out / "preprocessor_config.json").read_text())
    assert pp["max_pixels"] == 28 * 28 * 32 and pp["image_processor_type"] == "Qwen2VLImageProcessor"
    q = data.Processor.from_pretrained(out)
    assert q.image_processor == p.image_processor and q.chat_template == QWEN2VL_CHAT_TEMPLATE

    # Without a source folder the files are written from memory, and the oracle reads them the same way.
    bare = data.Processor(p.tokenizer, p.image_processor, chat_template=QWEN2VL_CHAT_TEMPLATE)
    out2 = tmp_path / "bare"
    bare.save_pretrained(out2)
    from transformers import AutoTokenizer
    tok2 = AutoTokenizer.from_pretrained(out2)
    text = bare.apply_chat_template([{"role": "user", "content": [IMG, TXT("hi there")]}], add_generation_prompt=True)
    assert tok2.encode(text, add_special_tokens=False) == oracle_tok.encode(text, add_special_tokens=False)
    assert tok2.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False) == \
        bare.apply_chat_template([{"role": "user", "content": "q"}])
    assert data.Processor.from_pretrained(out2).image_processor == p.image_processor
    assert json.loads((out2 / "tokenizer_config.json").read_text()) == data.tokenizer_config(QWEN2VL_CHAT_TEMPLATE)
    data.Processor(p.tokenizer).save_pretrained(out3 := tmp_path / "no_template")
    assert json.loads((out3 / "tokenizer_config.json").read_text()) == data.tokenizer_config()
    assert "chat_template" not in data.tokenizer_config()


def test_data_imports_no_project_module():
    """data.py is the bottom of the import graph: importing it loads no other file of the project."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = {f[:-3] for f in os.listdir(root) if f.endswith(".py")} - {"data"}
    code = "import sys, data; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=root)
    assert ours & set(out.stdout.split()) == set() and {"synth", "think", "rewards"} <= ours
