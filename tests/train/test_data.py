"""Training data pipeline: default corpus, document loading, cached BPE tokenizer, token stream packing and
the deterministic, sharded, resumable batch order."""

from __future__ import annotations

import json
import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3.train import data as D

# Small enough that the tokenizer trains in a fraction of a second, large enough to fill a 2048 vocabulary.
SMALL_CORPUS = 300_000
TRICKY = [
    "def f(x):\n    return x  # done\n",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\r\nCRLF\n\n\nblank lines",
    "unicode: héllo wörld, 日本語, emoji 🐍🚀, combining e\u0301",
    "",
    " ",
    "literal <|eos|> and <|bos|> text",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return D.default_corpus(SMALL_CORPUS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dsv3-cache")


@pytest.fixture(scope="module")
def tok(corpus, cache):
    return D.get_tokenizer(corpus, 2048, cache)


# ---- default corpus --------------------------------------------------------------------------------------


def test_default_corpus_deterministic_and_capped(corpus):
    files = D.default_corpus_files(SMALL_CORPUS)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files == D.default_corpus_files(SMALL_CORPUS)
    assert corpus == D.default_corpus(SMALL_CORPUS)
    assert len(corpus) > 10 and all(corpus)
    assert 0.9 * SMALL_CORPUS < sum(f.stat().st_size for f in files) <= SMALL_CORPUS
    rels = [f.relative_to(root) for f in files]
    assert rels == sorted(rels, key=lambda r: r.as_posix())
    for r in rels:
        assert r.suffix == ".py"
        assert not {"test", "tests", "idle_test", "site-packages"} & set(r.parts), r
    # The cap selects by a path hash, not alphabetically: the choice spans the library.
    assert len({r.parts[0] for r in rels}) > 10
    with pytest.raises(ValueError, match="max_bytes"):
        D.default_corpus(0)


# ---- tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_special_ids_and_round_trip(tok, corpus):
    assert [tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")] == [0, 1, 2]
    assert (D.BOS_ID, D.EOS_ID, D.PAD_ID) == (0, 1, 2)
    assert tok.get_vocab_size() == 2048
    for s in [*TRICKY, corpus[0], corpus[-1]]:
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s
    # Every byte is in the vocabulary: nothing maps to an unknown token.
    rare = bytes(range(256)).decode("latin-1") + "\U0001f9ec"
    assert tok.decode(tok.encode(rare).ids) == rare
    with pytest.raises(ValueError, match="vocab_size"):
        D.train_tokenizer(corpus, 100)


def test_tokenizer_cache_hit_and_env(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    first = D.get_tokenizer(corpus, 512, cache)
    files = list((cache / "tokenizers").glob("*.json"))
    assert len(files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(D, "train_tokenizer", no_training)
    again = D.get_tokenizer(corpus, 512, cache)
    assert again.to_str() == first.to_str()

    # DSV3_CACHE_DIR is the default root; the key covers the vocabulary size and the corpus contents.
    monkeypatch.setenv("DSV3_CACHE_DIR", str(cache))
    assert D.cache_root() == cache
    assert D.get_tokenizer(corpus, 512).to_str() == first.to_str()
    for other in [lambda: D.get_tokenizer(corpus, 600), lambda: D.get_tokenizer(corpus[1:], 512)]:
        with pytest.raises(AssertionError, match="retrained"):
            other()


def test_tokenizer_damaged_cache_is_rebuilt(corpus, tmp_path):
    tok = D.get_tokenizer(corpus[:20], 300, tmp_path)
    (path,) = (tmp_path / "tokenizers").glob("*.json")
    path.write_text("{ truncated")
    assert D.get_tokenizer(corpus[:20], 300, tmp_path).to_str() == tok.to_str()
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_transformers_loads_written_files(tok, corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    D.write_tokenizer_files(tok, tmp_path, model_max_length=1024)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.model_max_length == 1024
    for s in [*TRICKY, corpus[1][:2000]]:
        ids = tok.encode(s).ids
        assert hf(s)["input_ids"] == ids
        assert hf.decode(ids) == tok.decode(ids, skip_special_tokens=False)
    assert hf.decode(tok.encode(TRICKY[3]).ids) == TRICKY[3]


# ---- token stream ----------------------------------------------------------------------------------------


def test_token_stream_eos_between_documents_and_cache(tok, corpus, tmp_path, monkeypatch):
    docs = corpus[:30]
    stream = D.tokenize_documents(tok, docs, tmp_path)
    assert stream.dtype == np.int32 and stream.ndim == 1
    expected = []
    for d in docs:
        expected += tok.encode(d).ids + [D.EOS_ID]
    assert stream.tolist() == expected  # long documents are encoded in pieces: the ids must not change
    assert int((stream == D.EOS_ID).sum()) == len(docs)
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1

    monkeypatch.setattr(D, "_encode_stream", lambda *a: pytest.fail("re-encoded despite the cache"))
    assert np.array_equal(D.tokenize_documents(tok, docs, tmp_path), stream)


def test_token_stream_special_text_is_not_a_boundary(tok):
    docs = ["a <|eos|> b", "c<|bos|>"]
    stream = D.tokenize_documents(tok, docs, use_cache=False).tolist()
    assert stream.count(D.EOS_ID) == 2 and stream[-1] == D.EOS_ID and D.BOS_ID not in stream
    cut = stream.index(D.EOS_ID)
    assert tok.decode(stream[:cut]) == docs[0]


# ---- packing ---------------------------------------------------------------------------------------------


def test_packing_shapes_and_shift():
    tokens = np.arange(1000, dtype=np.int32)
    ds = D.PackedDataset(tokens, 32)
    assert len(ds) == 1000 // 33 and ds.num_tokens == len(ds) * 32
    assert torch.equal(ds.rows.flatten(), torch.arange(len(ds) * 33, dtype=torch.int32))
    x, y = ds.get_batch([0, 5, 29])
    assert x.shape == y.shape == (3, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[1], torch.arange(5 * 33, 5 * 33 + 32))
    xi, yi = ds[5]
    assert torch.equal(xi, x[1]) and torch.equal(yi, y[1])

    train, val = ds.split(4)
    assert (len(train), len(val)) == (26, 4)
    assert torch.equal(val.rows, ds.rows[-4:]) and torch.equal(train.rows, ds.rows[:-4])
    with pytest.raises(ValueError, match="val_sequences"):
        ds.split(len(ds))
    with pytest.raises(ValueError, match="seq_len"):
        D.PackedDataset(tokens, 0)
    with pytest.raises(ValueError, match="integer"):
        D.PackedDataset(np.zeros(10, dtype=np.float32), 4)

    # Evaluation: every row once over the ranks, in order.
    seen = [x for r in range(3) for x, _ in val.eval_batches(3, r, 3)]
    assert sorted(int(x[i, 0]) for x in seen for i in range(x.shape[0])) == val.rows[:, 0].tolist()


# ---- batch order -----------------------------------------------------------------------------------------


def _dataset(n_rows: int = 40, seq_len: int = 8) -> D.PackedDataset:
    return D.PackedDataset(torch.arange(n_rows * (seq_len + 1), dtype=torch.int32), seq_len)


def _take(loader: D.DataLoaderState, n: int) -> list[D.Batch]:
    return [loader.next_batch() for _ in range(n)]


def test_loader_epochs_are_shuffled_permutations():
    ds = _dataset(40)
    loader = D.DataLoaderState(ds, 12, seed=3)
    assert loader.steps_per_epoch == 3
    batches = _take(loader, 6)
    assert [b.epoch for b in batches] == [0, 0, 0, 1, 1, 1] and [b.step for b in batches] == list(range(6))
    e0 = torch.cat([b.indices for b in batches[:3]])
    e1 = torch.cat([b.indices for b in batches[3:]])
    assert len(set(e0.tolist())) == len(set(e1.tolist())) == 36  # no row twice within an epoch
    assert not torch.equal(e0, e1) and not torch.equal(e0, torch.arange(36))
    assert torch.equal(batches[0].inputs, ds.get_batch(batches[0].indices)[0])
    same_seed = D.DataLoaderState(ds, 12, seed=3).next_batch()
    other_seed = D.DataLoaderState(ds, 12, seed=4).next_batch()
    assert torch.equal(same_seed.indices, batches[0].indices)
    assert not torch.equal(other_seed.indices, batches[0].indices)
    ordered = D.DataLoaderState(ds, 12, shuffle=False).next_batch()
    assert torch.equal(ordered.indices, torch.arange(12))


def test_loader_data_parallel_shards_and_micro_batches():
    ds = _dataset(64)
    whole = _take(D.DataLoaderState(ds, 16, seed=7), 5)
    ranks = [
        _take(D.DataLoaderState(ds, 16, micro_batch_size=2, rank=r, world_size=4, seed=7), 5)
        for r in range(4)
    ]
    for step in range(5):
        shards = [ranks[r][step].indices for r in range(4)]
        assert all(s.numel() == 4 for s in shards)
        assert len(set(torch.cat(shards).tolist())) == 16  # disjoint
        assert torch.equal(torch.cat(shards), whole[step].indices)  # and covering the global batch, in order
        micro = ranks[1][step].micro_batches
        assert len(micro) == 2 and all(x.shape == (2, 8) for x, _ in micro)
        assert torch.equal(torch.cat([x for x, _ in micro]), ranks[1][step].inputs)
        assert torch.equal(torch.cat([y for _, y in micro]), ranks[1][step].targets)
    loader = D.DataLoaderState(ds, 16, micro_batch_size=2, world_size=4)
    assert loader.grad_accum_steps == 2 and len(loader.next_step()) == 2
    with pytest.raises(ValueError, match="world_size"):
        D.DataLoaderState(ds, 10, world_size=4)
    with pytest.raises(ValueError, match="micro_batch_size"):
        D.DataLoaderState(ds, 16, micro_batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="exceeds"):
        D.DataLoaderState(ds, 128)
    with pytest.raises(ValueError, match="rank"):
        D.DataLoaderState(ds, 16, rank=4, world_size=4)


def test_loader_resume_is_bit_exact():
    ds = _dataset(50)
    run = D.DataLoaderState(ds, 8, micro_batch_size=4, world_size=2, rank=1, seed=11)
    _take(run, 5)
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores
    continued = _take(run, 9)  # crosses an epoch boundary (6 steps per epoch)

    resumed = D.DataLoaderState(ds, 8, micro_batch_size=4, world_size=2, rank=1, seed=0)
    resumed.load_state_dict(state)
    for a, b in zip(continued, _take(resumed, 9), strict=True):
        assert (a.epoch, a.step) == (b.epoch, b.step)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.inputs, b.inputs)
        assert torch.equal(a.targets, b.targets)
    assert resumed.state_dict() == run.state_dict()

    # The position counts global rows: a run may resume on another number of ranks.
    single = D.DataLoaderState(ds, 8, seed=0)
    single.load_state_dict(state)
    both = [D.DataLoaderState(ds, 8, world_size=2, rank=r, seed=11) for r in range(2)]
    for loader in both:
        loader.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(single.next_batch().indices, torch.cat([r.next_batch().indices for r in both]))

    with pytest.raises(ValueError, match="different data"):
        D.DataLoaderState(_dataset(49), 8).load_state_dict(state)


# ---- loading user data -----------------------------------------------------------------------------------


def test_load_documents_txt_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nstill the first\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "b.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two", "id": 2}\n{"text": ""}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"body": "custom key"}\n')
    (tmp_path / "README.md").write_text("ignored in directories")

    assert D.load_documents(str(tmp_path / "a.txt")) == ["first document\n\nstill the first\n"]
    assert D.load_documents([tmp_path / "b.jsonl"]) == ["line one", "line two"]
    assert D.load_documents([tmp_path / "sub"], text_key="body") == ["custom key"]
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "nested"}\n')
    assert D.load_documents([tmp_path, tmp_path / "a.txt"]) == [
        "first document\n\nstill the first\n",
        "line one",
        "line two",
        "nested",
        "first document\n\nstill the first\n",
    ]


def test_load_documents_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        D.load_documents([tmp_path / "nope.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        D.load_documents([bad])
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*'text'"):
        D.load_documents([bad])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        D.load_documents([tmp_path / "data.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        D.load_documents([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no paths"):
        D.load_documents([])


def _hf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hf"
    (d / "train").mkdir(parents=True)
    (d / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    (d / "train" / "dataset_info.json").write_text("{}")
    (d / "train" / "state.json").write_text("{}")
    return d


def test_hf_datasets_dir_needs_datasets(tmp_path, monkeypatch):
    d = _hf_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    for path in (d, d / "train"):
        with pytest.raises(ImportError, match="pip install datasets"):
            D.load_documents([path])


def test_hf_datasets_dir_through_load_from_disk(tmp_path, monkeypatch):
    class FakeDataset:
        def __init__(self, rows):
            self.rows, self.column_names = rows, ["text", "id"]

        def __getitem__(self, key):
            return [r[key] for r in self.rows]

    calls = []

    def load_from_disk(path):
        calls.append(path)
        if path.endswith("train"):
            return FakeDataset([{"text": "solo", "id": 0}])
        return {
            "test": FakeDataset([{"text": "held out", "id": 9}]),
            "train": FakeDataset([{"text": "t", "id": 1}]),
        }

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_from_disk=load_from_disk))
    d = _hf_dir(tmp_path)
    assert D.load_documents([d]) == ["t"]  # a DatasetDict: its train split
    assert D.load_documents([d / "train"]) == ["solo"]
    with pytest.raises(KeyError, match="no column 'body'"):
        D.load_documents([d / "train"], text_key="body")
    assert calls[:2] == [str(d), str(d / "train")]


# ---- everything at once ----------------------------------------------------------------------------------


def test_prepare_data_end_to_end(tmp_path, tok):
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}: " + "word " * i}) + "\n" for i in range(200))
    )
    data = D.TrainingData.prepare(
        [str(tmp_path / "docs.jsonl")],
        seq_len=16,
        vocab_size=300,
        val_sequences=4,
        seed=5,
        cache_dir=tmp_path,
    )
    assert data.num_documents == 200 and data.tokenizer.get_vocab_size() <= 300
    assert len(data.val) == 4 and len(data.train) == data.num_tokens // 17 - 4
    loader = data.loader(8, 4, rank=0, world_size=1)
    assert loader.seed == 5
    micro = loader.next_step()
    assert len(micro) == 2 and micro[0][0].shape == (4, 16)
    assert sum(x.shape[0] for x, _ in data.validation_batches(3)) == 4

    # The default corpus with a given tokenizer: the cached stream of the module's tokenizer.
    default = D.prepare_data(seq_len=64, tokenizer=tok, max_bytes=SMALL_CORPUS, cache_dir=tmp_path)
    assert len(default.val) == min(64, (len(default.train) + len(default.val)) // 20)
    assert default.tokenizer is tok
    with pytest.raises(ValueError, match="at least 2"):
        D.prepare_data([str(tmp_path / "docs.jsonl")], seq_len=100_000, tokenizer=tok, cache_dir=tmp_path)
