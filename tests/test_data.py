"""The data pipeline: packing against an independent reference built from the concatenated stream,
the dp split, cp shards re-assembled by the layout, determinism and resume, every source kind,
a transformers tokenizer built locally (no download), and the errors of bad input."""

import json
import sysconfig

import numpy as np
import pytest
import torch

from lsts.config import DataConfig
from lsts.parallel.sharding import layout_indices
from lsts.train.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    Corpus,
    PackedDataLoader,
    build_data,
    load_corpus,
    load_texts,
    load_tokenizer,
    stdlib_files,
)


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    """`load_dataset` on local files writes Arrow caches: keep them out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))


def random_corpus(seed=0, n_docs=40, max_len=30) -> Corpus:
    """Documents of 1..max_len tokens (ids 0..255), some longer than the windows of the tests."""
    rng = np.random.default_rng(seed)
    return Corpus.from_documents(rng.integers(0, 256, size=rng.integers(1, max_len + 1)) for _ in range(n_docs))


def reference_window(corpus: Corpus, order, w: int, seq_len: int):
    """Window ``w`` computed the obvious way: concatenate the documents, label each position with its
    document id, and read inputs, labels, positions and boundaries off those arrays."""
    stream = np.concatenate([corpus.document(d) for d in order]).astype(np.int64)
    doc_id = np.repeat(np.arange(len(order)), [len(corpus.document(d)) for d in order])
    g = np.arange(w * seq_len, w * seq_len + seq_len)
    labels = np.where(doc_id[g + 1] == doc_id[g], stream[g + 1], IGNORE_INDEX)
    new_segment = np.r_[True, doc_id[g[1:]] != doc_id[g[:-1]]]
    starts = np.flatnonzero(new_segment)
    positions = np.arange(seq_len) - starts[np.cumsum(new_segment) - 1]
    return stream[g], labels, positions, np.r_[starts, seq_len]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.epoch, x.windows) == (y.epoch, y.windows)
        for name in ("tokens", "labels", "positions"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert all(torch.equal(c, d) for c, d in zip(x.cu_seqlens, y.cu_seqlens))


@pytest.mark.parametrize("seq_len", [4, 16, 50])
def test_packing_matches_the_concatenated_stream(seq_len):
    corpus = random_corpus()
    loader = PackedDataLoader(corpus, seq_len=seq_len, seed=3, layout="contiguous")
    order = loader.document_order(0)
    assert sorted(order) == list(range(corpus.n_docs))
    assert loader.batches_per_epoch == (corpus.n_tokens - 1) // seq_len
    for w in range(loader.batches_per_epoch):
        batch = next(loader)
        tokens, labels, positions, cu = reference_window(corpus, order, w, seq_len)
        assert batch.windows == [w]
        assert batch.tokens[0].tolist() == tokens.tolist()
        assert batch.labels[0].tolist() == labels.tolist()
        assert batch.positions[0].tolist() == positions.tolist()
        assert batch.cu_seqlens[0].tolist() == cu.tolist()
        assert batch.cu_seqlens[0].dtype == torch.int32


def test_labels_are_shifted_inputs_masked_at_document_ends():
    corpus = Corpus.from_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    loader = PackedDataLoader(corpus, seq_len=8, seed=0)
    batch = next(loader)
    order = loader.document_order(0)
    stream = np.concatenate([corpus.document(d) for d in order]).tolist()
    ends = np.cumsum([len(corpus.document(d)) for d in order])[:-1] - 1  # last token of a document
    expected = [IGNORE_INDEX if i in ends else stream[i + 1] for i in range(8)]
    assert batch.tokens[0].tolist() == stream[:8]
    assert batch.labels[0].tolist() == expected
    # Every segment's positions count from 0; cu_seqlens are the document lengths in order.
    assert batch.cu_seqlens[0].tolist() == [0, *np.cumsum([len(corpus.document(d)) for d in order])[:-1], 8]
    assert [p for p in batch.positions[0].tolist() if p == 0] == [0, 0, 0]


def test_dp_ranks_get_disjoint_windows_covering_the_stream():
    corpus, seq_len, batch_size, dp = random_corpus(n_docs=60), 8, 2, 3
    whole = PackedDataLoader(corpus, seq_len=seq_len, batch_size=1, seed=5)
    reference = [next(whole).tokens[0] for _ in range(whole.batches_per_epoch)]
    seen = {}
    for rank in range(dp):
        loader = PackedDataLoader(corpus, seq_len=seq_len, batch_size=batch_size, seed=5, dp_rank=rank, dp_world=dp)
        for batch in take(loader, loader.batches_per_epoch):
            assert batch.epoch == 0 and batch.tokens.shape == (batch_size, seq_len)
            for row, w in enumerate(batch.windows):
                assert w % dp == rank and w not in seen
                seen[w] = batch.tokens[row]
    n_batches = whole.batches_per_epoch // (batch_size * dp)
    assert sorted(seen) == list(range(n_batches * batch_size * dp))  # a prefix of the stream, no gaps
    assert all(torch.equal(seen[w], reference[w]) for w in seen)


@pytest.mark.parametrize(
    "layout,cp",
    [("zigzag", 2), ("zigzag", 4), ("contiguous", 3), ("stripe", 2), ("balanced", 2), ("balanced", 3), ("auto", 2)],
)
def test_cp_shards_reassemble_to_the_unsharded_batch(layout, cp):
    corpus, seq_len = random_corpus(n_docs=80), 24
    full = take(PackedDataLoader(corpus, seq_len=seq_len, batch_size=2, seed=1), 3)
    shards = [
        take(PackedDataLoader(corpus, seq_len=seq_len, batch_size=2, seed=1, cp_rank=r, cp_world=cp, layout=layout), 3)
        for r in range(cp)
    ]
    for step, want in enumerate(full):
        for name in ("tokens", "labels", "positions"):
            got = torch.empty_like(getattr(want, name))
            for rank in range(cp):
                part, mine = getattr(shards[rank][step], name), shards[rank][step]
                assert part.shape == (2, seq_len // cp)
                for row, (row_layout, cu) in enumerate(zip(mine.layouts, mine.cu_seqlens)):
                    assert row_layout == layout or layout == "auto"
                    got[row, layout_indices(seq_len, cp, rank, row_layout, cu)] = part[row]
            assert torch.equal(got, getattr(want, name)), name
        for rank in range(cp):
            mine = shards[rank][step]
            assert all(torch.equal(c, d) for c, d in zip(mine.cu_seqlens, want.cu_seqlens))  # global


def _pairs(cu, columns) -> int:
    """Causal-within-document (query, key) pairs of the queries ``columns``, one query at a time."""
    return sum(p - max(c for c in cu if c <= p) + 1 for p in columns.tolist())


@pytest.mark.parametrize("doc_masking", [True, False])
def test_auto_layout_takes_the_least_loaded_busiest_rank_and_reports_the_work(doc_masking):
    corpus, seq_len, cp = random_corpus(n_docs=80), 32, 4
    kw = dict(seq_len=seq_len, batch_size=2, seed=2, cp_world=cp, layout="auto", doc_masking=doc_masking)
    batches = take(PackedDataLoader(corpus, **kw), 4)
    chose = []
    for batch in batches:
        work = [0] * cp
        for row, cu in enumerate(batch.cu_seqlens):
            cu = cu.tolist() if doc_masking else [0, seq_len]
            cost = {}
            for layout in ("zigzag", "balanced") if doc_masking else ("zigzag",):
                cost[layout] = [
                    _pairs(cu, layout_indices(seq_len, cp, r, layout, batch.cu_seqlens[row])) for r in range(cp)
                ]
            best = min(cost, key=lambda name: max(cost[name]))
            assert max(cost[batch.layouts[row]]) == max(cost[best]), (row, cost)
            chose.append(batch.layouts[row])
            work = [a + b for a, b in zip(work, cost[batch.layouts[row]])]
        assert batch.cp_work == work
    # Under doc masking some rows are better balanced by documents; without it, only zigzag is a choice.
    assert "balanced" in chose if doc_masking else set(chose) == {"zigzag"}


def test_same_seed_same_batches_other_seed_other_batches():
    corpus = random_corpus(n_docs=50)
    make = lambda seed: PackedDataLoader(corpus, seq_len=10, batch_size=2, seed=seed)  # noqa: E731
    assert_same_batches(take(make(7), 12), take(make(7), 12))
    a, b = take(make(7), 3), take(make(8), 3)
    assert not all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))


def test_epochs_reshuffle_and_cover_the_corpus():
    corpus = random_corpus(n_docs=30)
    loader = PackedDataLoader(corpus, seq_len=6, seed=2)
    n = loader.batches_per_epoch
    assert not np.array_equal(loader.document_order(0), loader.document_order(1))
    batches = take(loader, n + 1)
    assert [b.epoch for b in batches] == [0] * n + [1]
    order1 = loader.document_order(1)
    assert batches[n].windows == [0]
    assert batches[n].tokens[0].tolist() == reference_window(corpus, order1, 0, 6)[0].tolist()


@pytest.mark.parametrize("stop", ["mid_epoch", "end_of_epoch", "after_epoch"])
def test_resume_equals_uninterrupted_run(stop):
    corpus = random_corpus(n_docs=40)
    make = lambda: PackedDataLoader(corpus, seq_len=8, batch_size=2, seed=4, dp_rank=1, dp_world=2)  # noqa: E731
    per_epoch = make().batches_per_epoch
    k = {"mid_epoch": per_epoch // 2, "end_of_epoch": per_epoch, "after_epoch": per_epoch + 1}[stop]
    straight = take(make(), k + per_epoch + 2)
    first = make()
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, per_epoch + 2), straight[k:])


def test_resume_refuses_another_stream():
    loader = PackedDataLoader(random_corpus(), seq_len=8, seed=4)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedDataLoader(random_corpus(), seq_len=8, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="corpus"):
        PackedDataLoader(random_corpus(seed=1), seq_len=8, seed=4).load_state_dict(state)


def write_sources(root):
    """Two .txt files (one with a blank line: still one document) and a .jsonl with a custom field."""
    (root / "b.txt").write_text("second file\n")
    (root / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    records = [{"body": "jsonl one", "id": 1}, {"body": "", "id": 2}, {"body": "jsonl three ü", "id": 3}]
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_txt_and_jsonl_sources(tmp_path):
    write_sources(tmp_path)
    assert load_texts(str(tmp_path / "a.txt"))["text"] == ["first paragraph\n\nsecond paragraph\n"]
    assert load_texts(str(tmp_path / "c.jsonl"), "body")["text"] == ["jsonl one", "", "jsonl three ü"]
    texts = load_texts(str(tmp_path), "body")["text"]  # directory: sorted .txt files, then the .jsonl
    assert texts == ["first paragraph\n\nsecond paragraph\n", "second file\n", "jsonl one", "", "jsonl three ü"]
    corpus = load_corpus(str(tmp_path), ByteTokenizer(), "body")
    assert corpus.n_docs == 4  # the empty record is no document
    assert ByteTokenizer().decode(corpus.document(3)) == "jsonl three ü"
    cfg = DataConfig(dataset=str(tmp_path), text_field="body", seq_len=8, batch_size=2)
    batch = next(build_data(cfg, dp_rank=0, dp_world=1, cp_rank=0, cp_world=2, layout="zigzag", vocab_size=256))
    assert batch.tokens.shape == (2, 4) and batch.tokens.dtype == torch.int64


@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_corpus("stdlib", ByteTokenizer())


def test_stdlib_corpus_is_real_and_stable(stdlib_corpus):
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    root = sysconfig.get_paths()["stdlib"]
    parts = {p for f in files for p in f.relative_to(root).parts}
    assert not parts & {"site-packages", "test", "tests"}
    assert stdlib_corpus.n_docs > 100 and stdlib_corpus.n_tokens > 1_000_000
    assert "import " in ByteTokenizer().decode(stdlib_corpus.tokens[:100_000])
    loader = build_data(
        DataConfig(seq_len=64), dp_rank=0, dp_world=1, cp_rank=0, cp_world=1, layout="zigzag", vocab_size=256
    )
    assert loader.corpus.fingerprint == stdlib_corpus.fingerprint  # the same stream on a second read
    assert next(loader).tokens.shape == (1, 64)


def test_transformers_tokenizer_built_offline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ["the cat sat", "on the mat", "a dog ran", "the end"]
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        tmp_path / "tok"
    )
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in words))
    cfg = DataConfig(dataset=str(tmp_path / "docs.jsonl"), tokenizer=str(tmp_path / "tok"), seq_len=4)
    loader = build_data(cfg, dp_rank=0, dp_world=1, cp_rank=0, cp_world=1, layout="zigzag", vocab_size=256)
    tokenizer = load_tokenizer(cfg.tokenizer)
    eos = tokenizer.eos_id
    assert tokenizer.vocab_size == raw.get_vocab_size()
    assert loader.corpus.n_docs == 4 and loader.corpus.n_tokens == 3 + 3 + 3 + 2 + 4  # words + one EOS each
    for d in range(4):
        assert loader.corpus.document(d)[-1] == eos
    assert tokenizer.decode(loader.corpus.document(0)[:-1]) == "the cat sat"
    with pytest.raises(ValueError, match=r"model.vocab_size >= \d+"):
        build_data(cfg, dp_rank=0, dp_world=1, cp_rank=0, cp_world=1, layout="zigzag", vocab_size=4)


def _build(tmp_path, ranks, **overrides):
    cfg = DataConfig(**{"dataset": str(tmp_path / "a.txt"), "seq_len": 8, **overrides})
    kw = {"dp_rank": 0, "dp_world": 1, "cp_rank": 0, "cp_world": 1, "layout": "zigzag", "vocab_size": 256}
    return build_data(cfg, **{**kw, **ranks})


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"dataset": "/no/such/corpus.jsonl"}, "'/no/such/corpus.jsonl': no such file"),
        ({"dataset": "empty.txt"}, "no non-empty document"),
        ({"dataset": "c.jsonl", "text_field": "content"}, "no field 'content'.*'body'"),
        ({"dataset": "broken.jsonl"}, "'.*broken.jsonl': could not read json"),
        ({"dataset": "notes.md"}, "'.*notes.md' is or holds no .txt or .jsonl file"),
        ({"seq_len": 12, "ranks": {"cp_world": 4, "cp_rank": 1}}, "sequence length 12 .* multiple of 8"),
        ({"tokenizer": "/no/such/tokenizer"}, "'/no/such/tokenizer': no such directory.*'byte'"),
        ({"tokenizer": "empty_dir"}, "'.*empty_dir' could not be loaded"),
        ({"seq_len": 4096}, "too few for one batch"),
        ({"ranks": {"cp_world": 2, "layout": "stripe"}}, "doc_masking needs parallel.layout"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else None,
)
def test_bad_input_names_the_value(tmp_path, overrides, match):
    write_sources(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    (tmp_path / "notes.md").write_text("# not a corpus format\n")
    for key in ("dataset", "tokenizer"):
        if key in overrides and not overrides[key].startswith("/"):
            overrides[key] = str(tmp_path / overrides[key])
    ranks = overrides.pop("ranks", {})
    with pytest.raises(ValueError, match=match):
        _build(tmp_path, ranks=ranks, **overrides)


def test_unknown_hub_dataset_fails_clearly_offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Offline, the lookup fails at once instead of retrying the network for half a minute.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"'no-such-org/no-such-corpus'.*'stdlib'"):
        load_texts("no-such-org/no-such-corpus")
