"""Training data: documents, a byte-level BPE tokenizer trained on them, packed fixed-length sequences, and a
deterministic, resumable, data-parallel batch order.

Pipeline, each stage cached on disk so a second run starts in well under a second:

    documents  = default_corpus() or load_documents(paths)
    tokenizer  = get_tokenizer(documents, vocab_size)          # cache: <cache>/tokenizers/<key>.json
    tokens     = tokenize_documents(tokenizer, documents)      # cache: <cache>/tokens/<key>.npy (int32)
    train, val = PackedDataset(tokens, seq_len).split(val_sequences)
    loader     = DataLoaderState(train, global_batch_size, micro_batch_size=..., rank=..., world_size=...)

`prepare_data(...)` runs the first four lines in one call.

The default corpus is the `.py` source of the Python standard library of the running interpreter
(`sysconfig.get_paths()["stdlib"]`, test suites and site-packages excluded): it is on every machine Python
runs on, so `dsv3 train` needs no download, and code is a corpus a tiny model visibly learns from.

The cache root is `$DSV3_CACHE_DIR`, else `$XDG_CACHE_HOME/dsv3`, else `~/.cache/dsv3`. Cache files are
written to a temporary name and renamed, so ranks that build the same cache at once (every rank of a fresh
torchrun job) all end up reading one complete file; they compute the same bytes, so who wins does not matter.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "DEFAULT_VOCAB_SIZE",
    "DEFAULT_CORPUS_BYTES",
    "cache_root",
    "default_corpus_files",
    "default_corpus",
    "load_documents",
    "corpus_fingerprint",
    "train_tokenizer",
    "get_tokenizer",
    "write_tokenizer_files",
    "tokenize_documents",
    "PackedDataset",
    "Batch",
    "DataLoaderState",
    "TrainingData",
    "prepare_data",
]

log = logging.getLogger(__name__)

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
# The trainer lists the special tokens first, so they take ids 0, 1, 2; ModelConfig's default bos/eos ids
# (0 and 1) rely on it.
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

DEFAULT_VOCAB_SIZE = 2048  # ModelConfig.preset("tiny").vocab_size
DEFAULT_CORPUS_BYTES = 8_000_000
# 256 byte symbols + the special tokens: a smaller vocabulary cannot encode every byte.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# Bumped whenever the tokenizer recipe or the token stream layout changes, so stale caches are not reused.
_RECIPE = "dsv3-bytelevel-bpe-v1"
_STREAM_FORMAT = "dsv3-token-stream-v1"

# Directories of the standard library that are test suites (or third-party code) rather than library source.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

# transformers' own placeholder for "no limit" (tokenization_utils_base.VERY_LARGE_INTEGER).
_NO_MAX_LENGTH = int(1e30)


# ---- cache -----------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory the tokenizer and token-stream caches live under (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("DSV3_CACHE_DIR"):
        return Path(os.environ["DSV3_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dsv3"


def _atomic_write(path: Path, write) -> None:
    """Calls `write(tmp_path)` and renames the result onto `path`: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# ---- documents -------------------------------------------------------------------------------------------


def default_corpus_files(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """The standard-library `.py` files of the default corpus, sorted by path, at most `max_bytes` in all.

    Files are considered in the order of a hash of their path relative to the stdlib root and taken while
    they fit: a deterministic choice that spreads over the whole library rather than its alphabetical head.
    """
    if max_bytes <= 0:
        raise ValueError(f"default_corpus: max_bytes must be > 0, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned in place so the walk never enters site-packages (often larger than the library itself).
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and path.is_file():
                rel = path.relative_to(root).as_posix()
                candidates.append((hashlib.sha256(rel.encode()).digest(), rel, path))
    if not candidates:
        raise RuntimeError(
            f"default corpus: no .py files under the standard library at {root} (a zipped or source-less "
            "Python install); pass training data paths instead"
        )
    chosen, total = [], 0
    for _, rel, path in sorted(candidates):
        size = path.stat().st_size
        if total + size <= max_bytes:
            chosen.append((rel, path))
            total += size
    return [path for _, path in sorted(chosen)]


def _read_python_source(path: Path) -> str | None:
    data = path.read_bytes()
    try:
        # Honour PEP 263 coding cookies; the library is UTF-8 but nothing forbids another declared encoding.
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[str]:
    """The bundled training data: the sources of `default_corpus_files(max_bytes)`, one document per file,
    in path order. The same list on every call for a given Python install."""
    docs = []
    for path in default_corpus_files(max_bytes):
        text = _read_python_source(path)
        if text:
            docs.append(text)
    return docs


def _import_datasets():
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _is_hf_dataset_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _load_hf_dataset(path: Path, text_key: str) -> list[str]:
    datasets = _import_datasets()
    if datasets is None:
        raise ImportError(
            f"load_documents: {path} is a Hugging Face `datasets` directory (written by save_to_disk); "
            "reading it needs the `datasets` package: pip install datasets"
        )
    ds = datasets.load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: its train split, or every split in name order
        splits = ["train"] if "train" in ds else sorted(ds.keys())
        parts = [ds[s] for s in splits]
    else:
        parts = [ds]
    docs = []
    for part in parts:
        if text_key not in part.column_names:
            raise KeyError(
                f"load_documents: dataset {path} has no column {text_key!r} (columns: {part.column_names}); "
                "pass text_key="
            )
        docs.extend(t for t in part[text_key] if isinstance(t, str) and t)
    return docs


def _load_jsonl(path: Path, text_key: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"load_documents: {path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(
                    f"load_documents: {path}:{lineno}: expected a JSON object with a string field "
                    f"{text_key!r} (set text_key= for another field name)"
                )
            if record[text_key]:
                docs.append(record[text_key])
    return docs


def _load_file(path: Path, text_key: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path, text_key)
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [text] if text else []
    raise ValueError(f"load_documents: {path}: unsupported file type {suffix!r} (expected .txt or .jsonl)")


def load_documents(
    paths: str | os.PathLike | Sequence[str | os.PathLike], text_key: str = "text"
) -> list[str]:
    """Documents from user data, in the order given (directories in sorted path order).

    - `.txt`: the whole file is one document.
    - `.jsonl`: one document per line, the string field `text_key` of each JSON object.
    - a directory: every `.txt` / `.jsonl` file below it (other files ignored), or, when it holds
      `dataset_info.json` / `state.json` / `dataset_dict.json`, a Hugging Face `datasets` directory written by
      `save_to_disk` (column `text_key`; of a DatasetDict the `train` split, else all splits), which needs
      the `datasets` package.

    Empty documents are dropped. Raises FileNotFoundError for a missing path and ValueError when nothing
    usable is found.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("load_documents: no paths given")
    docs: list[str] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"load_documents: {path} does not exist")
        if path.is_dir():
            if _is_hf_dataset_dir(path):
                docs.extend(_load_hf_dataset(path, text_key))
                continue
            files = sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".jsonl")
            )
            if not files:
                raise ValueError(f"load_documents: directory {path} holds no .txt or .jsonl files")
            for f in files:
                docs.extend(_load_file(f, text_key))
        else:
            docs.extend(_load_file(path, text_key))
    if not docs:
        raise ValueError(f"load_documents: no non-empty documents in {[str(p) for p in paths]}")
    return docs


def corpus_fingerprint(docs: Iterable[str]) -> str:
    """A hash of the documents' contents and boundaries: the key of everything cached for a corpus."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# ---- tokenizer -------------------------------------------------------------------------------------------


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size}"
        )


def train_tokenizer(docs: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization, no normalization, no prefix space, so decoding gives
    back the exact text) trained on `docs`, with `<|bos|>`, `<|eos|>`, `<|pad|>` at ids 0, 1, 2. Its
    vocabulary is `vocab_size` tokens, or fewer if the corpus has too few distinct pairs to merge."""
    _check_vocab_size(vocab_size)
    if not docs:
        raise ValueError("train_tokenizer: no documents")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, seen in the corpus or not: any input must stay encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer, length=len(docs))
    _check_special_ids(tok, "train_tokenizer")
    return tok


def _check_special_ids(tok: Tokenizer, where: str) -> None:
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [BOS_ID, EOS_ID, PAD_ID]:
        raise ValueError(f"{where}: special tokens {SPECIAL_TOKENS} must have ids 0, 1, 2, got {ids}")


def get_tokenizer(
    docs: Sequence[str] | str = "default",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """`train_tokenizer(docs, vocab_size)`, cached as `<cache_root>/tokenizers/<key>.json`, the key hashing
    the corpus contents (`corpus_fingerprint`), the vocabulary size and the recipe version.

    `docs` is a list of documents, or the string "default" for `default_corpus()`.
    """
    if isinstance(docs, str):
        if docs != "default":
            raise ValueError(
                f'get_tokenizer: docs must be a list of documents or "default", got the string {docs!r}'
            )
        docs = default_corpus()
    _check_vocab_size(vocab_size)
    key = _digest(_RECIPE, str(vocab_size), corpus_fingerprint(docs))[:32]
    path = cache_root(cache_dir) / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
            _check_special_ids(tok, "get_tokenizer")
            return tok
        except Exception as e:  # a damaged cache entry is rebuilt, never trusted
            log.warning("tokenizer cache %s unreadable (%s); retraining", path, e)
    log.info("training a %d-token BPE tokenizer on %d documents", vocab_size, len(docs))
    tok = train_tokenizer(docs, vocab_size)
    _atomic_write(path, lambda tmp: tok.save(str(tmp)))
    return tok


def write_tokenizer_files(
    tok: Tokenizer, directory: str | os.PathLike, model_max_length: int | None = None
) -> None:
    """Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `directory`, so
    `tokenizers.Tokenizer.from_file(dir/"tokenizer.json")` and transformers'
    `AutoTokenizer.from_pretrained(dir)` both load the tokenizer and encode identically (no BOS/EOS added on
    encode). `model_max_length` should be the model's `max_position_embeddings`; None means no limit."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _check_special_ids(tok, "write_tokenizer_files")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # transformers would otherwise rewrite " ." as "." on decode, breaking the byte-exact round trip.
        "clean_up_tokenization_spaces": False,
        "model_max_length": _NO_MAX_LENGTH if model_max_length is None else int(model_max_length),
        "padding_side": "right",
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }

    def dump(obj: Any):
        return lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    _atomic_write(directory / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
    _atomic_write(directory / "tokenizer_config.json", dump(config))
    _atomic_write(directory / "special_tokens_map.json", dump(special))


# ---- token stream ----------------------------------------------------------------------------------------

# Cut points inside a document that the byte-level pre-tokenizer also cuts at: after a printable ASCII
# character and before a newline. No pre-token holds both a non-space character and a newline, and the
# pre-tokenizer's regex only looks ahead, so encoding the pieces and concatenating gives exactly the ids of
# encoding the whole document; short pieces spread over the encoder's threads and encode faster.
_CUT = re.compile(r"(?<=[!-~])(?=\n)")
_PIECE_CHARS = 4096


def _pieces(doc: str) -> list[str]:
    if len(doc) <= _PIECE_CHARS:
        return [doc]
    out, cur, n = [], [], 0
    for part in _CUT.split(doc):
        cur.append(part)
        n += len(part)
        if n >= _PIECE_CHARS:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def _encode_stream(tok: Tokenizer, docs: Sequence[str], batch_docs: int = 256) -> np.ndarray:
    # A copy that reads "<|eos|>" etc. inside a document as plain text: only the separators added here may
    # carry the special ids, or a document quoting them would forge a document boundary.
    enc = Tokenizer.from_str(tok.to_str())
    enc.encode_special_tokens = True
    chunks: list[np.ndarray] = []
    eos = np.array([EOS_ID], dtype=np.int32)
    for start in range(0, len(docs), batch_docs):
        group = [_pieces(d) for d in docs[start : start + batch_docs]]
        encoded = iter(enc.encode_batch([p for ps in group for p in ps], add_special_tokens=False))
        for ps in group:
            for _ in ps:
                chunks.append(np.asarray(next(encoded).ids, dtype=np.int32))
            chunks.append(eos)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def tokenize_documents(
    tok: Tokenizer,
    docs: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> np.ndarray:
    """The token stream of the corpus: each document encoded, followed by `<|eos|>` (id 1), all concatenated;
    a 1-D int32 array. Cached as `<cache_root>/tokens/<key>.npy`, keyed by the tokenizer and the corpus."""
    if not use_cache:
        return _encode_stream(tok, docs)
    key = _digest(_STREAM_FORMAT, tok.to_str(), corpus_fingerprint(docs))[:32]
    path = cache_root(cache_dir) / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            tokens = np.load(path, allow_pickle=False)
            if tokens.dtype == np.int32 and tokens.ndim == 1:
                return tokens
            log.warning("token cache %s has dtype %s shape %s; rebuilding", path, tokens.dtype, tokens.shape)
        except (OSError, ValueError) as e:
            log.warning("token cache %s unreadable (%s); rebuilding", path, e)
    log.info("tokenizing %d documents", len(docs))
    tokens = _encode_stream(tok, docs)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, tokens, allow_pickle=False)

    _atomic_write(path, write)
    return tokens


# ---- packed sequences ------------------------------------------------------------------------------------


class PackedDataset:
    """The token stream cut into consecutive, non-overlapping rows of `seq_len + 1` tokens (the remainder
    dropped); row i gives `inputs = row[:-1]`, `targets = row[1:]`. Rows are views of one int32 tensor;
    batches come out as int64, what embeddings and cross-entropy take."""

    def __init__(self, tokens: np.ndarray | torch.Tensor | Sequence[int], seq_len: int):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"PackedDataset: seq_len must be an int >= 1, got {seq_len}")
        t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        if t.ndim != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(
                f"PackedDataset: tokens must be a 1-D integer array, got {t.dtype} {tuple(t.shape)}"
            )
        t = t.to(torch.int32)
        n = t.numel() // (seq_len + 1)
        self.seq_len = seq_len
        self.rows = t[: n * (seq_len + 1)].view(n, seq_len + 1)

    @classmethod
    def _from_rows(cls, rows: torch.Tensor) -> PackedDataset:
        ds = cls.__new__(cls)
        ds.seq_len = rows.shape[1] - 1
        ds.rows = rows
        return ds

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def num_tokens(self) -> int:
        """Input tokens over all rows (`len(self) * seq_len`)."""
        return len(self) * self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[i].long()
        return row[:-1], row[1:]

    def get_batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [b, seq_len], targets [b, seq_len]) int64 for the rows `indices`."""
        rows = self.rows[torch.as_tensor(indices, dtype=torch.long)].long()
        return rows[:, :-1], rows[:, 1:]

    def split(self, val_sequences: int) -> tuple[PackedDataset, PackedDataset]:
        """(train, val): the last `val_sequences` rows held out for validation."""
        if not 0 <= val_sequences < len(self):
            raise ValueError(
                f"PackedDataset.split: val_sequences must be in [0, {len(self)}) for {len(self)} sequences, "
                f"got {val_sequences}"
            )
        cut = len(self) - val_sequences
        return PackedDataset._from_rows(self.rows[:cut]), PackedDataset._from_rows(self.rows[cut:])

    def eval_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once, in order, this rank's share (rows `rank::world_size`) in batches of up to
        `batch_size`. Ranks may get different batch counts: reduce summed losses once after the loop."""
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"PackedDataset.eval_batches: batch_size must be >= 1, got {batch_size}")
        idx = torch.arange(rank, len(self), world_size)
        for start in range(0, idx.numel(), batch_size):
            yield self.get_batch(idx[start : start + batch_size])


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}"
        )


# ---- batch order -----------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One optimizer step's data on this rank."""

    inputs: torch.Tensor  # [local_batch, seq_len] int64
    targets: torch.Tensor  # [local_batch, seq_len] int64, inputs shifted by one
    indices: torch.Tensor  # [local_batch] row indices into the dataset
    epoch: int
    step: int  # global step this batch belongs to, counted from 0 over all epochs
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(inputs, targets) of each gradient-accumulation micro-batch, views of `inputs`/`targets`."""

    @property
    def num_tokens(self) -> int:
        return self.inputs.numel()


class DataLoaderState:
    """Deterministic, resumable batch order over a PackedDataset for data-parallel training.

    Each epoch is a permutation of the rows drawn from `torch.Generator().manual_seed(f(seed, epoch))`. A step
    takes the next `global_batch_size` rows of it; rank r of `world_size` gets the r-th contiguous slice of
    `global_batch_size // world_size` rows, split into micro-batches of `micro_batch_size` for gradient
    accumulation. When fewer than a global batch of rows remain, the epoch ends (those rows wait for the next
    epoch's shuffle) and the next permutation starts. Iteration never stops: take as many steps as needed.

    `state_dict()` holds the epoch, the rows consumed in it, the step and the seed; a loader given it through
    `load_state_dict()` yields exactly the batches the saved one would have yielded next. The position counts
    rows of the global batch, so a run may resume with another world size, or change the global batch size
    between steps (batch-size warmup).
    """

    def __init__(
        self,
        dataset: PackedDataset,
        global_batch_size: int,
        *,
        micro_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        _check_rank(rank, world_size)
        self.dataset = dataset
        self.rank, self.world_size = rank, world_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # rows of the current epoch's permutation already consumed (all ranks together)
        self.step = 0
        self._perm: tuple[int, torch.Tensor] | None = None
        self.set_batch_size(global_batch_size, micro_batch_size)

    def set_batch_size(self, global_batch_size: int, micro_batch_size: int | None = None) -> None:
        """Sets the global batch size (rows per step over all ranks) and the micro-batch size (rows per
        forward/backward on one rank; None = the whole local batch)."""
        w = self.world_size
        if global_batch_size < 1 or global_batch_size % w:
            raise ValueError(
                f"DataLoaderState: global_batch_size must be a positive multiple of world_size={w}, "
                f"got {global_batch_size}"
            )
        if global_batch_size > len(self.dataset):
            raise ValueError(
                f"DataLoaderState: global_batch_size={global_batch_size} exceeds the {len(self.dataset)} "
                "sequences of the dataset (use more data, a shorter seq_len or a smaller batch)"
            )
        local = global_batch_size // w
        micro = local if micro_batch_size is None else micro_batch_size
        if micro < 1 or local % micro:
            raise ValueError(
                f"DataLoaderState: micro_batch_size must divide the per-rank batch {local} "
                f"(global_batch_size {global_batch_size} / world_size {w}), got {micro_batch_size}"
            )
        self.global_batch_size, self.local_batch_size, self.micro_batch_size = global_batch_size, local, micro

    @property
    def grad_accum_steps(self) -> int:
        return self.local_batch_size // self.micro_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size

    def _permutation(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            n = len(self.dataset)
            if self.shuffle:
                # Seed and epoch mixed through a hash: nearby (seed, epoch) pairs give unrelated orders.
                mixed = hashlib.sha256(f"{self.seed}/{self.epoch}".encode()).digest()[:8]
                gen = torch.Generator().manual_seed(int.from_bytes(mixed, "little") >> 1)
                perm = torch.randperm(n, generator=gen)
            else:
                perm = torch.arange(n)
            self._perm = (self.epoch, perm)
        return self._perm[1]

    def next_batch(self) -> Batch:
        if len(self.dataset) - self.position < self.global_batch_size:
            self.epoch += 1
            self.position = 0
        perm = self._permutation()
        start = self.position + self.rank * self.local_batch_size
        indices = perm[start : start + self.local_batch_size]
        inputs, targets = self.dataset.get_batch(indices)
        m = self.micro_batch_size
        micro = list(zip(inputs.split(m), targets.split(m), strict=True))
        batch = Batch(inputs, targets, indices, self.epoch, self.step, micro)
        self.position += self.global_batch_size
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (inputs, targets) micro-batches of the next step on this rank: `next_batch().micro_batches`."""
        return self.next_batch().micro_batches

    def state_dict(self) -> dict[str, int]:
        """Plain ints (JSON- and torch.save-friendly). The rank, world size and batch sizes are not part of
        it: they come from the resumed run's own configuration."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "num_sequences": len(self.dataset),
            "seq_len": self.dataset.seq_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        n, s = int(state["num_sequences"]), int(state["seq_len"])
        if (n, s) != (len(self.dataset), self.dataset.seq_len):
            raise ValueError(
                f"DataLoaderState.load_state_dict: the state is for {n} sequences of {s} tokens, this "
                f"dataset has {len(self.dataset)} of {self.dataset.seq_len} (different data or seq_len)"
            )
        if not 0 <= int(state["position"]) <= n or int(state["epoch"]) < 0:
            raise ValueError(f"DataLoaderState.load_state_dict: invalid position/epoch in {state}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.position, self.step = int(state["position"]), int(state["step"])
        self._perm = None


# ---- everything at once ----------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """What `prepare_data` returns: the tokenizer and the packed train / validation sequences."""

    tokenizer: Tokenizer
    train: PackedDataset
    val: PackedDataset
    num_documents: int
    num_tokens: int  # length of the token stream, before packing drops the remainder
    fingerprint: str  # corpus_fingerprint of the documents
    seed: int = 0  # default seed of loader()

    @classmethod
    def prepare(
        cls,
        paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        *,
        seq_len: int,
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        val_sequences: int | None = None,
        corpus_bytes: int = DEFAULT_CORPUS_BYTES,
        seed: int = 0,
        tokenizer: Tokenizer | str | os.PathLike | None = None,
        text_key: str = "text",
        cache_dir: str | os.PathLike | None = None,
    ) -> TrainingData:
        """`prepare_data` with the default corpus for empty `paths` too, and `seed` kept for `loader()`."""
        data = prepare_data(
            paths or None,
            seq_len=seq_len,
            vocab_size=vocab_size,
            val_sequences=val_sequences,
            tokenizer=tokenizer,
            text_key=text_key,
            max_bytes=corpus_bytes,
            cache_dir=cache_dir,
        )
        data.seed = seed
        return data

    def loader(
        self,
        global_batch_size: int,
        micro_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
    ) -> DataLoaderState:
        """The shuffled, resumable training batch order (see DataLoaderState)."""
        return DataLoaderState(
            self.train,
            global_batch_size,
            micro_batch_size=micro_batch_size,
            rank=rank,
            world_size=world_size,
            seed=self.seed if seed is None else seed,
        )

    def validation_batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) over the held-out sequences, in order (see PackedDataset.eval_batches)."""
        return self.val.eval_batches(batch_size, rank, world_size)

    def write_tokenizer(self, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
        """`write_tokenizer_files(self.tokenizer, directory, model_max_length)`."""
        write_tokenizer_files(self.tokenizer, directory, model_max_length)


def prepare_data(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    seq_len: int,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_sequences: int | None = None,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    text_key: str = "text",
    max_bytes: int = DEFAULT_CORPUS_BYTES,
    cache_dir: str | os.PathLike | None = None,
) -> TrainingData:
    """Documents (`load_documents(paths, text_key)`, or `default_corpus(max_bytes)` when `paths` is None),
    the tokenizer (`tokenizer` given as a Tokenizer or a tokenizer.json path, e.g. to continue training a
    checkpoint; else `get_tokenizer(docs, vocab_size)`), the cached token stream, packed into `seq_len`
    sequences and split into train / val (`val_sequences` rows held out; None = min(64, 5% of the rows)).

    Idempotent and cached: every rank of a job may call it; the second call on a machine is fast."""
    docs = default_corpus(max_bytes) if paths is None else load_documents(paths, text_key)
    if tokenizer is None:
        tok = get_tokenizer(docs, vocab_size, cache_dir)
    elif isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = Tokenizer.from_file(str(Path(tokenizer).expanduser()))
    _check_special_ids(tok, "prepare_data")
    tokens = tokenize_documents(tok, docs, cache_dir)
    packed = PackedDataset(tokens, seq_len)
    if len(packed) < 2:
        raise ValueError(
            f"prepare_data: {tokens.size} tokens make {len(packed)} sequences of {seq_len + 1}; need at "
            "least 2 (more data or a shorter seq_len)"
        )
    if val_sequences is None:
        val_sequences = max(1, min(64, len(packed) // 20))
    train, val = packed.split(val_sequences)
    return TrainingData(tok, train, val, len(docs), int(tokens.size), corpus_fingerprint(docs))
