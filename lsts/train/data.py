"""The trainer's data pipeline: text corpus → tokens → packed windows → split by dp rank → cp shards.

Sources (``DataConfig.dataset``):

- ``"stdlib"``: every ``*.py`` file of the running interpreter's standard library (sorted paths;
  ``site-packages`` and test directories skipped), one document per file. About 12 MB of real text
  that exists offline on every machine; it differs between Python versions, which the checkpointed
  corpus fingerprint catches at resume.
- a ``.txt`` / ``.jsonl`` / ``.json`` file, or a directory searched recursively for ``.txt`` and
  ``.jsonl`` files (sorted; hidden ones skipped): one document per ``.txt`` *file* (blank lines stay
  inside the text: code and prose keep their paragraphs) and one per JSON record (its
  ``text_field``). Read with ``datasets.load_dataset``, which caches the parsed files.
- anything else is a Hugging Face dataset, ``"name"`` or ``"name:config"``, split ``"train"``; it
  loads where it is cached or the Hub is reachable (``HF_HUB_OFFLINE=1`` skips the network retries).

Tokenizers: ``"byte"`` (`ByteTokenizer`: UTF-8 bytes, ids 0-255, no special ids, no download) or a
transformers tokenizer name or saved directory. No special tokens are added, except that a
tokenizer with an EOS token gets it appended to every document (the model then learns where texts
end). Documents are delimited by boundaries, not by separator tokens.

Packing. Each epoch orders the documents by a permutation seeded with ``(seed, epoch)`` and lays
them end to end into one stream. Window ``w`` is ``stream[w·S : w·S + S + 1]`` (``S = seq_len``):
its inputs are the first ``S`` tokens and its labels the last ``S`` (pre-shifted), so consecutive
windows share one token and every token is a label exactly once. In a window the documents become
*segments* (a document cut by the window edge continues in the next window as a new segment):
``cu_seqlens`` marks them, RoPE ``positions`` restart at 0 in each, and a label that would cross
into the next document is ``IGNORE_INDEX`` (nothing predicts a new text from the end of another).
``doc_masking`` only decides whether the consumer passes ``cu_seqlens`` to attention.

Splitting: window ``i`` of an epoch goes to dp rank ``i mod dp_world``; a batch takes
``batch_size`` windows per rank. The tail of an epoch that does not fill a batch on every rank is
dropped, so all ranks run the same number of steps. Each cp rank keeps the columns
`lsts.parallel.sharding.layout_indices` gives it; ``cu_seqlens`` stays global, as the attention
kernels take it. Layout ``"auto"`` picks, for every row, among ``auto_layouts`` (by default whole-pack
zigzag and ``balanced``) the one whose busiest cp rank computes the fewest unmasked (query, key)
pairs (ties: the first); `Batch` says which layout each row took and the work of every cp rank.
The loader state is ``(epoch, windows consumed)``: a pure function of the seed,
so resuming reproduces the uninterrupted run exactly.

Limits: the whole corpus is tokenized into memory at start-up (right for the demo corpus; a
web-scale corpus wants pre-tokenized shards, not this module). No worker processes: a batch is a
few slices of an in-memory array.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsts.kernels.loss import IGNORE_INDEX
from lsts.parallel.balance import work_per_rank
from lsts.parallel.sharding import DOCUMENT_LAYOUTS, check_seq_len, layout_indices

_TEXT_SUFFIXES = (".txt",)
_JSON_SUFFIXES = (".jsonl", ".json")  # a .json file is read when named itself
AUTO_LAYOUTS = ("zigzag", "balanced")  # what layout "auto" chooses from by default, preferred first
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# --- tokenizers ---------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255. No special ids: the vocabulary is exactly the 256 byte values,
    so it fits ``model.vocab_size = 256``; documents end where their boundaries say."""

    name = "byte"
    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> np.ndarray:
        # "replace" keeps lone surrogates (possible in JSON escapes) from failing a whole corpus.
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind the same small interface as `ByteTokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.name = tokenizer.name_or_path
        self.vocab_size = len(tokenizer)  # counts added tokens, unlike tokenizer.vocab_size
        self.eos_id = tokenizer.eos_token_id

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # verbose=False: documents longer than model_max_length are fine here, packing cuts them.
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(i, dtype=np.int64) for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def load_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"``, or a transformers tokenizer from a local directory or a (cached) Hub name."""
    if name == "byte":
        return ByteTokenizer()
    fix = "use data.tokenizer='byte' (no download) or a directory written by tokenizer.save_pretrained"
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ValueError(f"data.tokenizer {name!r}: no such directory; {fix}")
    from transformers import AutoTokenizer  # slow import, only when asked for

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if _looks_like_path(name) else name)
    except Exception as e:  # OSError, HFValidationError, ...: all mean "cannot load it here"
        raise ValueError(f"data.tokenizer {name!r} could not be loaded ({type(e).__name__}: {e}); {fix}") from e
    return HFTokenizer(tokenizer)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


# --- corpus -------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Corpus:
    """Tokenized documents end to end in source order: ``tokens[offsets[d]:offsets[d + 1]]`` is
    document ``d``. Stored in the narrowest unsigned dtype that holds the ids (bytes: 1 byte a token)."""

    tokens: np.ndarray
    offsets: np.ndarray  # int64 [n_docs + 1]

    @classmethod
    def from_documents(cls, docs: Iterable[Iterable[int] | np.ndarray]) -> Corpus:
        """Empty documents are dropped: a zero-length segment would break ``cu_seqlens``."""
        arrays = [a for a in (np.asarray(d, dtype=np.int64).reshape(-1) for d in docs) if a.size]
        if not arrays:
            raise ValueError("the corpus has no non-empty document")
        tokens = np.concatenate(arrays)
        if tokens.min() < 0:
            raise ValueError(f"token ids must be >= 0, got {int(tokens.min())}")
        top = int(tokens.max())
        dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.int64
        offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int64)
        return cls(tokens.astype(dtype), offsets)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d] : self.offsets[d + 1]]

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the token stream, so that a resume on another corpus fails instead of drifting."""
        docs, ids = zlib.crc32(self.offsets.tobytes()), zlib.crc32(np.ascontiguousarray(self.tokens))
        return f"{self.n_docs}:{self.n_tokens}:{self.tokens.dtype}:{docs:08x}:{ids:08x}"


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files, sorted; third-party packages and tests left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def load_texts(dataset: str, text_field: str = "text"):
    """The documents of ``dataset`` as a `datasets.Dataset` with one string column ``"text"``."""
    import datasets

    if dataset == "stdlib":
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
        return datasets.Dataset.from_dict({"text": texts})
    if _looks_like_path(dataset) or dataset.endswith(_TEXT_SUFFIXES + _JSON_SUFFIXES):
        return _load_files(dataset, text_field)
    name, _, config = dataset.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # ConnectionError, DatasetNotFoundError, FileNotFoundError, ...
        raise ValueError(
            f"data.dataset {dataset!r} could not be loaded as a Hugging Face dataset ({type(e).__name__}: {e}); "
            "it must be cached or reachable online. Use data.dataset='stdlib' (offline) or a path to "
            ".txt/.jsonl files"
        ) from e
    return _text_column(ds, text_field, dataset)


def _load_files(dataset: str, text_field: str):
    import datasets

    path = Path(dataset).expanduser()
    if not path.exists():
        raise ValueError(f"data.dataset {dataset!r}: no such file or directory; use 'stdlib' or an existing path")
    if path.is_dir():
        # .jsonl only, not .json: a directory of corpora often holds .json metadata (e.g. dataset_info.json).
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not _hidden(p.relative_to(path))]
        txt = [str(p) for p in files if p.suffix in _TEXT_SUFFIXES]
        jsonl = [str(p) for p in files if p.suffix == ".jsonl"]
    else:
        txt = [str(path)] if path.suffix in _TEXT_SUFFIXES else []
        jsonl = [str(path)] if path.suffix in _JSON_SUFFIXES else []
    if not txt and not jsonl:
        raise ValueError(f"data.dataset {dataset!r} is or holds no .txt or .jsonl file")
    parts = []
    if txt:  # sample_by="document": one example per file, its text whole
        parts.append(_read("text", txt, dataset, sample_by="document"))
    if jsonl:
        parts.append(_text_column(_read("json", jsonl, dataset), text_field, dataset))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read(builder: str, files: list[str], dataset: str, **kwargs):
    """``load_dataset(builder)`` on local files; a file it cannot parse is the user's to fix."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:  # DatasetGenerationError wraps the parser's own error
        cause = e.__cause__ or e
        raise ValueError(
            f"data.dataset {dataset!r}: could not read {builder} file(s) {files[:3]} ({type(cause).__name__}: "
            f"{cause}); fix or remove them"
        ) from e


def _text_column(ds, text_field: str, dataset: str):
    if text_field not in ds.column_names:
        raise ValueError(
            f"data.dataset {dataset!r} has no field {text_field!r}; set data.text_field to one of {ds.column_names}"
        )
    ds = ds.select_columns([text_field])
    return ds if text_field == "text" else ds.rename_column(text_field, "text")


def tokenize(texts, tokenizer: ByteTokenizer | HFTokenizer, batch_size: int = 1000) -> Corpus:
    """A `Corpus` of ``texts`` (a `datasets.Dataset` with a ``"text"`` column, or a list of str)."""
    if isinstance(texts, list):
        batches = (texts[i : i + batch_size] for i in range(0, len(texts), batch_size))
    else:
        batches = (b["text"] for b in texts.iter(batch_size=batch_size))
    eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], dtype=np.int64)
    docs = []
    for batch in batches:
        batch = [t for t in batch if t]  # None or "" is no document
        for ids in tokenizer.encode_batch(batch) if batch else []:
            docs.append(ids if eos is None or not ids.size else np.concatenate([ids, eos]))
    return Corpus.from_documents(docs)


def load_corpus(dataset: str, tokenizer: ByteTokenizer | HFTokenizer, text_field: str = "text") -> Corpus:
    """`load_texts` then `tokenize`; ValueError naming ``dataset`` when nothing is left."""
    texts = load_texts(dataset, text_field)
    try:
        return tokenize(texts, tokenizer)
    except ValueError as e:
        raise ValueError(f"data.dataset {dataset!r}: {e}; give a source with text in field {text_field!r}") from e


# --- packing, splitting, sharding ---------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch of one (dp, cp) rank. ``S_local = seq_len / cp_world``.

    ``positions`` are RoPE ids at this rank's global columns (restarting at every segment);
    ``cu_seqlens[row]`` (int32, global) are that row's segment boundaries, one tensor per row since
    the attention API takes one set per call: pass it when ``doc_masking``."""

    tokens: torch.Tensor  # [B, S_local] int64
    labels: torch.Tensor  # [B, S_local] int64, IGNORE_INDEX where nothing is trained
    positions: torch.Tensor  # [B, S_local] int64
    cu_seqlens: list[torch.Tensor]  # B × [n_segments + 1] int32
    epoch: int
    windows: list[int]  # the rows' window indices in the epoch's stream
    layouts: list[str]  # the cp layout of each row (its columns, and what attention must be told)
    cp_work: list[int]  # unmasked (query, key) pairs of every cp rank over the rows, under those layouts


def pack_window(tokens: np.ndarray, doc_starts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Inputs, labels, positions and cu_seqlens of a window of ``S + 1`` tokens whose documents
    begin at the window offsets ``doc_starts`` (each in ``(0, S]``)."""
    seq_len = len(tokens) - 1
    inputs, labels = tokens[:-1], tokens[1:].copy()
    labels[doc_starts - 1] = IGNORE_INDEX  # that label is the first token of the next document
    cu = np.concatenate([[0], doc_starts[doc_starts < seq_len], [seq_len]]).astype(np.int64)
    positions = np.arange(seq_len) - np.repeat(cu[:-1], np.diff(cu))
    return inputs, labels, positions, cu


class PackedDataLoader:
    """An endless iterator of `Batch` for one (dp, cp) rank; see the module docstring for the rules."""

    def __init__(
        self,
        corpus: Corpus,
        *,
        seq_len: int,
        batch_size: int = 1,
        seed: int = 0,
        dp_rank: int = 0,
        dp_world: int = 1,
        cp_rank: int = 0,
        cp_world: int = 1,
        layout: str = "zigzag",
        doc_masking: bool = True,
        auto_layouts: tuple[str, ...] = AUTO_LAYOUTS,
    ) -> None:
        self.layouts = row_layouts(layout, auto_layouts, doc_masking)
        _check_ranks(seq_len, batch_size, dp_rank, dp_world, cp_rank, cp_world, self.layouts)
        self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.cp_rank, self.cp_world, self.doc_masking = cp_rank, cp_world, doc_masking
        self.windows_per_epoch = (corpus.n_tokens - 1) // seq_len
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the corpus has {corpus.n_tokens} tokens: too few for one batch of {batch_size} × {dp_world} "
                f"dp ranks × {seq_len + 1} tokens; lower data.seq_len or data.batch_size, or add text"
            )
        self._set_position(epoch=0, cursor=0)

    @property
    def batches_per_epoch(self) -> int:
        return self.windows_per_epoch // (self.batch_size * self.dp_world)

    def document_order(self, epoch: int) -> np.ndarray:
        """The permutation of documents that makes the stream of ``epoch``."""
        # A SeedSequence of (seed, epoch): epoch 1 of seed 0 is not epoch 0 of seed 1.
        return np.random.default_rng([self.seed % 2**64, epoch]).permutation(self.corpus.n_docs)

    def _set_position(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor
        self._order = self.document_order(epoch)
        # Stream offset of each document in this epoch's order, plus the end of the stream.
        self._starts = np.concatenate([[0], np.cumsum(self.corpus.lengths[self._order])])

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (int64 ``[S + 1]``) of window ``w`` of the current epoch and the offsets in it of
        the documents that begin inside it, after its first token."""
        lo, hi = w * self.seq_len, w * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        stop = int(np.searchsorted(self._starts, hi, side="left"))  # documents first..stop-1 overlap
        pieces = []
        for k in range(first, stop):
            base = self.corpus.offsets[self._order[k]] - self._starts[k]  # stream offset → corpus offset
            a, b = max(lo, self._starts[k]), min(hi, self._starts[k + 1])
            pieces.append(self.corpus.tokens[base + a : base + b])
        return np.concatenate(pieces).astype(np.int64), self._starts[first + 1 : stop] - lo

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        step = self.batch_size * self.dp_world
        if self.cursor + step > self.windows_per_epoch:
            self._set_position(self.epoch + 1, 0)
        windows = [self.cursor + j * self.dp_world + self.dp_rank for j in range(self.batch_size)]
        rows = [pack_window(*self.window(w)) for w in windows]
        self.cursor += step
        picks = [self.pick_layout(r[3]) for r in rows]
        cols = [columns[self.cp_rank] for _, columns, _ in picks]
        tokens, labels, positions = (
            torch.stack([torch.from_numpy(r[i])[c] for r, c in zip(rows, cols)]) for i in range(3)
        )
        return Batch(
            tokens=tokens,
            labels=labels,
            positions=positions,
            cu_seqlens=[torch.from_numpy(r[3]).to(torch.int32) for r in rows],
            epoch=self.epoch,
            windows=windows,
            layouts=[layout for layout, _, _ in picks],
            cp_work=[sum(work) for work in zip(*(w for _, _, w in picks))],
        )

    def pick_layout(self, cu: np.ndarray) -> tuple[str, list[torch.Tensor], list[int]]:
        """``(layout, columns of every cp rank, work of every cp rank)`` of a row with segments ``cu``:
        of `self.layouts`, the one whose busiest cp rank has the least work (ties: the first).
        Work counts the pairs attention computes: inside segments under doc masking, else causal
        over the whole row."""
        work_cu = cu if self.doc_masking else [0, self.seq_len]
        best = None
        for layout in self.layouts:
            if self.cp_world == 1:  # one cp rank holds the whole sequence whatever the layout
                columns = [torch.arange(self.seq_len)]
            else:
                columns = [layout_indices(self.seq_len, self.cp_world, r, layout, cu) for r in range(self.cp_world)]
            work = work_per_rank(work_cu, self.cp_world, columns)
            if best is None or max(work) < max(best[2]):
                best = (layout, columns, work)
        return best

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands after the last batch returned. The position counts windows of the
        whole dp group, so a resume with another dp_world or batch_size continues the same stream."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "corpus": self.corpus.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`; ValueError when it describes another stream."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "corpus"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data checkpoint was written for {key}={state.get(key)!r}, this run has {mine[key]!r}; "
                    "resume with the data config (and Python version, for 'stdlib') of that run, or start afresh"
                )
        self._set_position(int(state["epoch"]), int(state["cursor"]))


def row_layouts(layout: str, auto_layouts: tuple[str, ...], doc_masking: bool) -> tuple[str, ...]:
    """The layouts a row may take: ``auto_layouts`` under ``"auto"``, else ``layout`` alone. Layouts
    cut by documents need doc masking: attention must be given the documents they were cut by."""
    layouts = tuple(auto_layouts) if layout == "auto" else (layout,)
    if not doc_masking:
        if layout != "auto" and layout in DOCUMENT_LAYOUTS:
            raise ValueError(
                f"parallel.layout {layout!r} cuts the sequence by its documents, which attention sees only with "
                "data.doc_masking=true; enable it or choose zigzag"
            )
        layouts = tuple(name for name in layouts if name not in DOCUMENT_LAYOUTS)
    if not layouts:
        raise ValueError(f"layout 'auto' has no layout to choose from among {tuple(auto_layouts)}")
    return layouts


def _check_ranks(seq_len, batch_size, dp_rank, dp_world, cp_rank, cp_world, layouts) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"data.seq_len ({seq_len}) and data.batch_size ({batch_size}) must be >= 1")
    if not 0 <= dp_rank < dp_world or not 0 <= cp_rank < cp_world:
        raise ValueError(f"ranks out of range: dp {dp_rank} of {dp_world}, cp {cp_rank} of {cp_world}")
    if cp_world > 1:
        for layout in layouts:
            check_seq_len(seq_len, layout, cp_world)


def build_data(
    data_cfg,
    *,
    dp_rank: int,
    dp_world: int,
    cp_rank: int,
    cp_world: int,
    layout: str,
    vocab_size: int,
    auto_layouts: tuple[str, ...] = AUTO_LAYOUTS,
) -> PackedDataLoader:
    """The loader of one (dp, cp) rank from a `lsts.config.DataConfig` (``auto_layouts``: what layout
    "auto" chooses from). Cheap checks run before the corpus is read, so a bad layout fails at once."""
    d = data_cfg
    _check_ranks(
        d.seq_len, d.batch_size, dp_rank, dp_world, cp_rank, cp_world, row_layouts(layout, auto_layouts, d.doc_masking)
    )
    if d.doc_masking and cp_world > 1 and layout == "stripe":
        raise ValueError(
            "data.doc_masking needs parallel.layout 'zigzag' or 'contiguous' under context parallelism "
            "(striped shards have no contiguous runs for document bounds); change the layout or set "
            "data.doc_masking=false"
        )
    tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"data.tokenizer {d.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )
    corpus = load_corpus(d.dataset, tokenizer, d.text_field)
    return PackedDataLoader(
        corpus,
        seq_len=d.seq_len,
        batch_size=d.batch_size,
        seed=d.seed,
        dp_rank=dp_rank,
        dp_world=dp_world,
        cp_rank=cp_rank,
        cp_world=cp_world,
        layout=layout,
        doc_masking=d.doc_masking,
        auto_layouts=auto_layouts,
    )


__all__ = [
    "AUTO_LAYOUTS",
    "IGNORE_INDEX",
    "Batch",
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "PackedDataLoader",
    "build_data",
    "load_corpus",
    "load_texts",
    "load_tokenizer",
    "pack_window",
    "row_layouts",
    "stdlib_files",
    "tokenize",
]
