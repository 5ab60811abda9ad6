"""Corpora, tokenizers, the on-disk token cache and the deterministic samplers.

Corpora come through Hugging Face ``datasets``:

* ``stdlib`` (default, offline everywhere): every ``.py`` file of the running
  interpreter's standard library (``sysconfig.get_paths()["stdlib"]``, site-packages
  excluded), one document per file; about 31 MB on CPython 3.11. Its content
  fingerprint is logged and stored with the tokens, since it varies with the Python
  version.
* ``text_files``: local files given by ``data.paths`` (one document per file;
  undecodable bytes become U+FFFD rather than an error);
* ``hub``: a hub dataset (WikiText-103, PG-19 presets) for users with network.

Tokenizers: ``bytes`` (UTF-8 bytes + an end-of-document id 256; nothing to download),
``bpe`` (byte-level BPE trained locally with ``tokenizers`` on the training split and
cached), or ``hub:<name>`` (a pretrained tokenizer when online).

Tokens are cached as flat arrays (``train.bin``, ``val.bin`` + ``meta.json``) under
``<cache_dir>/tokens/<corpus fingerprint>-<tokenizer fingerprint>/``, written to a
temporary folder and renamed into place, then memory-mapped by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relpos.errors import RelposError
from relpos.io import atomic_write_text

log = logging.getLogger(__name__)

EOS_BYTES = 256


@dataclass
class Corpus:
    name: str
    fingerprint: str
    tokenizer: str
    vocab_size: int
    train: np.ndarray  # flat token ids (memory-mapped)
    val: np.ndarray


# ----------------------------------------------------------------------------- documents


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def _check_files(paths: Iterable[str]) -> list[str]:
    paths = [os.path.expanduser(p) for p in paths]
    if not paths:
        raise RelposError("data=text_files needs data.paths=[<file>,...] (none given)")
    for p in paths:
        if os.path.isdir(p):
            raise RelposError(f"corpus path {p} is a directory; data.paths lists files "
                              f"(e.g. data.paths=[{p.rstrip('/')}/a.txt,...])")
        if not os.path.isfile(p):
            raise RelposError(f"corpus file not found: {p}")
        if not os.access(p, os.R_OK):
            raise RelposError(f"corpus file is not readable: {p}")
        if os.path.getsize(p) == 0:
            raise RelposError(f"corpus file is empty: {p}")
    return paths


def _load_text_files(paths: list[str], cache_dir: str):
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(
        "text", data_files=paths, sample_by="document", split="train",
        encoding_errors="replace", cache_dir=os.path.join(cache_dir, "hf"),
    )


def _split_by_hash(ids: list[str], val_fraction: float) -> np.ndarray:
    """True for validation documents; depends only on each document's id."""
    return np.array([(zlib.crc32(i.encode()) % 10_000) < val_fraction * 10_000 for i in ids])


def load_documents(cfg) -> tuple[list[str], list[str], str]:
    """(train documents, validation documents, content fingerprint)."""
    cache_dir = os.path.expanduser(cfg.cache_dir)
    if cfg.source in ("stdlib", "text_files"):
        if cfg.source == "stdlib":
            files = [str(p) for p in stdlib_files()]
            root = sysconfig.get_paths()["stdlib"]
            ids = [os.path.relpath(f, root) for f in files]
        else:
            files = _check_files(cfg.paths)
            ids = [os.path.basename(f) + f"#{i}" for i, f in enumerate(files)]
        if cfg.max_documents:
            files, ids = files[: cfg.max_documents], ids[: cfg.max_documents]
        texts = _load_text_files(files, cache_dir)["text"]
        is_val = _split_by_hash(ids, cfg.val_fraction)
        train, val = _split_docs(list(texts), is_val, cfg.val_fraction)
    elif cfg.source == "hub":
        train, val = _load_hub(cfg)
    else:
        raise RelposError(f"data.source must be one of stdlib, text_files, hub; got {cfg.source!r}")
    h = hashlib.sha256()
    for part, docs in (("train", train), ("val", val)):
        h.update(part.encode())
        for d in docs:
            h.update(hashlib.sha256(d.encode("utf-8", "replace")).digest())
    return train, val, h.hexdigest()[:16]


def _split_docs(docs: list[str], is_val, val_fraction: float) -> tuple[list[str], list[str]]:
    """Documents by their hash flag; if either side would be empty (too few documents),
    hold out the tail of the concatenated text instead."""
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    if train and val:
        return train, val
    return _split_tail(docs, val_fraction)


def _split_tail(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last ``val_fraction`` of the characters (single-document corpora)."""
    text = "".join(docs)
    cut = int(len(text) * (1 - val_fraction))
    return [text[:cut]], [text[cut:]]


def _load_hub(cfg) -> tuple[list[str], list[str]]:
    import datasets

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise RelposError(
            f"hub dataset {cfg.hub.path!r} needs network, but the hub is offline here "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); offline options: data=stdlib (default) "
            "or data=text_files data.paths=[...]"
        )
    try:
        ds = datasets.load_dataset(cfg.hub.path, cfg.hub.name,
                                   cache_dir=os.path.join(os.path.expanduser(cfg.cache_dir), "hf"))
    except Exception as e:  # noqa: BLE001 - any failure to reach or parse the hub
        raise RelposError(
            f"could not load hub dataset {cfg.hub.path!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); without network use data=stdlib "
            "or data=text_files data.paths=[...]"
        ) from None
    col = cfg.hub.text_column

    def docs(split):
        rows = ds[split][col]
        return ["".join(rows)] if cfg.hub.join_lines else [r for r in rows if r]

    train = docs(cfg.hub.train_split)
    if cfg.hub.val_split:
        return train, docs(cfg.hub.val_split)
    is_val = _split_by_hash([str(i) for i in range(len(train))], cfg.val_fraction)
    return _split_docs(train, is_val, cfg.val_fraction)


# ----------------------------------------------------------------------------- tokenizers


class BytesTokenizer:
    name = "bytes"
    vocab_size = 257
    eos_id = EOS_BYTES
    fingerprint = "bytes-v1"

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        parts = []
        for d in docs:
            parts.append(np.frombuffer(d.encode("utf-8", "replace"), np.uint8).astype(np.uint16))
            parts.append(np.array([self.eos_id], np.uint16))
        return np.concatenate(parts) if parts else np.zeros(0, np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", "replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (locally trained BPE or from the hub)."""

    def __init__(self, tok, name: str, fingerprint: str):
        self.tok, self.name, self.fingerprint = tok, name, fingerprint
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id("<|endoftext|>")

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size < 2**16 else np.uint32
        parts = []
        for enc in self.tok.encode_batch(docs, add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype))
            if self.eos_id is not None:
                parts.append(np.array([self.eos_id], dtype))
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def train_bpe(docs: list[str], vocab_size: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    atomic_write_text(path, tok.to_str())
    return tok


def get_tokenizer(cfg, train_docs: list[str], corpus_fp: str):
    from tokenizers import Tokenizer

    if cfg.tokenizer == "bytes":
        return BytesTokenizer()
    if cfg.tokenizer == "bpe":
        if cfg.bpe_vocab_size < 257:
            raise RelposError(f"data.bpe_vocab_size must be >= 257, got {cfg.bpe_vocab_size}")
        path = Path(os.path.expanduser(cfg.cache_dir)) / "tokenizers" / (
            f"{corpus_fp}-bpe{cfg.bpe_vocab_size}.json")
        if path.exists():
            tok = Tokenizer.from_file(str(path))
        else:
            log.info("training a byte-level BPE tokenizer (vocab %d)", cfg.bpe_vocab_size)
            tok = train_bpe(train_docs, cfg.bpe_vocab_size, path)
        return HFTokenizer(tok, f"bpe{cfg.bpe_vocab_size}", path.stem)
    if cfg.tokenizer.startswith("hub:"):
        name = cfg.tokenizer[4:]
        try:
            tok = (Tokenizer.from_file(name) if os.path.isfile(name)
                   else Tokenizer.from_pretrained(name))
        except Exception as e:  # noqa: BLE001
            raise RelposError(
                f"could not load tokenizer {name!r} ({type(e).__name__}); offline options: "
                "data.tokenizer=bytes or data.tokenizer=bpe, or a local tokenizer.json path"
            ) from None
        fp = hashlib.sha256(tok.to_str().encode()).hexdigest()[:12]
        return HFTokenizer(tok, cfg.tokenizer, fp)
    raise RelposError(
        f"data.tokenizer must be bytes, bpe or hub:<name>; got {cfg.tokenizer!r}")


# ----------------------------------------------------------------------------- cache


def load_corpus(cfg) -> Corpus:
    """Documents -> tokens, through the on-disk cache."""
    cache_root = Path(os.path.expanduser(cfg.cache_dir))
    train_docs, val_docs, corpus_fp = load_documents(cfg)
    tok = get_tokenizer(cfg, train_docs, corpus_fp)
    key = f"{cfg.name}-{corpus_fp}-{tok.fingerprint}"
    folder = cache_root / "tokens" / key
    if not (folder / "meta.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists()
                                    else _mkdir(folder.parent), prefix=f".{key}."))
        dtypes = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            ids = tok.encode_documents(docs)
            ids.tofile(tmp / f"{split}.bin")
            dtypes[split] = (str(ids.dtype), int(ids.size))
        (tmp / "meta.json").write_text(json.dumps(
            {"dataset": cfg.name, "fingerprint": corpus_fp, "tokenizer": tok.name,
             "vocab_size": tok.vocab_size, "splits": dtypes}, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {s: np.memmap(folder / f"{s}.bin", dtype=dt, mode="r", shape=(n,))
              for s, (dt, n) in meta["splits"].items()}
    log.info("corpus %s fingerprint %s: %d train / %d val tokens (%s, vocab %d), cache %s",
             cfg.name, corpus_fp, arrays["train"].size, arrays["val"].size, tok.name,
             tok.vocab_size, folder)
    return Corpus(cfg.name, corpus_fp, tok.name, tok.vocab_size, arrays["train"], arrays["val"])


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ----------------------------------------------------------------------------- samplers


def window_starts(n_tokens: int, *, seed: int, step: int, batch_size: int,
                  length: int) -> np.ndarray:
    """The first token of each of step ``step``'s ``batch_size`` training windows of
    ``length + 1`` tokens in a split of ``n_tokens`` (int64 ``[batch_size]``); depends only
    on (seed, step). :func:`train_batch` gathers the windows on the host; the trainer
    sends only these starts and gathers on the device (the same tokens)."""
    n = n_tokens - length - 1
    if n < 0:
        raise RelposError(
            f"training split has {n_tokens} tokens, too few for train.length={length}")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n + 1, size=batch_size)


def train_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int,
                length: int) -> np.ndarray:
    """``[batch_size, length + 1]`` int32 windows; depends only on (seed, step)."""
    starts = window_starts(tokens.shape[0], seed=seed, step=step, batch_size=batch_size,
                           length=length)
    idx = starts[:, None] + np.arange(length + 1)[None, :]
    return np.asarray(tokens[idx], np.int32)


def random_positions(*, seed: int, step: int, batch_size: int, length: int,
                     max_position: int) -> np.ndarray:
    """Randomized positions (Ruoss et al. 2023): for each sequence a sorted random
    subset of ``[0, max_position)`` of size ``length``; ``[batch_size, length]`` int32."""
    if max_position < length:
        raise RelposError(
            f"train.randomized_positions={max_position} must be >= train.length={length}")
    rng = np.random.default_rng([seed, step, 1])
    pos = np.stack([np.sort(rng.choice(max_position, size=length, replace=False))
                    for _ in range(batch_size)])
    return pos.astype(np.int32)
