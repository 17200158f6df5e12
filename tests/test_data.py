"""Data preparation: splits, tokenizer, sources and batch order."""

import json
import random
from collections import Counter

import numpy as np
import pytest

from ds_upcycle.data.config import DataConfig
from ds_upcycle.data.loader import BatchOrder, PackedSequences, validation_batches
from ds_upcycle.data.prepare import prepare_data
from ds_upcycle.data.prepare import split_of
from ds_upcycle.data.sources import resolve_source
from ds_upcycle.data.synthetic import SyntheticSpec, build_world, generate_documents
from ds_upcycle.data.tokenizer import EOS_ID, load_tokenizer
from ds_upcycle.errors import UserError

SPEC = "synthetic:docs=400,seed=5,entities=20"


def documents_of(prepared, split):
    sp = load_tokenizer(prepared.tokenizer_path)
    tokens = np.asarray(prepared.tokens(split))
    ends = np.flatnonzero(tokens == EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [sp.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_data(DataConfig(source=SPEC, vocab_size=400, cache_dir=str(tmp_path_factory.mktemp("c"))))


def test_splits_are_disjoint_and_complete(prepared):
    docs = list(generate_documents(SyntheticSpec.parse(SPEC)))
    by_split = {s: documents_of(prepared, s) for s in ("pretrain", "cpt", "val")}
    assert sorted(sum(by_split.values(), [])) == sorted(docs)  # tokenization round-trips every document
    for split, texts in by_split.items():
        assert texts and all(split_of(t, 0.05, 0.35, 0) == split for t in texts)
    sets = [set(v) for v in by_split.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    meta = prepared.meta
    assert meta["splits"]["val"]["documents"] == len(by_split["val"])


def test_preparation_is_deterministic_and_cached(prepared, tmp_path):
    again = prepare_data(DataConfig(source=SPEC, vocab_size=400, cache_dir=str(tmp_path)))
    assert again.tokenizer_path.read_bytes() == prepared.tokenizer_path.read_bytes()
    for split in ("pretrain", "cpt", "val"):
        assert np.array_equal(again.tokens(split), prepared.tokens(split))
    mtime = (again.path / "meta.json").stat().st_mtime_ns
    third = prepare_data(DataConfig(source=SPEC, vocab_size=400, cache_dir=str(tmp_path)))
    assert third.path == again.path and (third.path / "meta.json").stat().st_mtime_ns == mtime


def test_given_tokenizer_is_used(prepared, tmp_path):
    other = prepare_data(DataConfig(source="synthetic:docs=200,seed=9,entities=20", cache_dir=str(tmp_path)),
                         tokenizer=prepared.tokenizer_path)
    assert other.tokenizer_path.read_bytes() == prepared.tokenizer_path.read_bytes()


def test_local_files(tmp_path):
    texts = [f"document number {i} says {'abc ' * (i % 7)} end." for i in range(60)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    src = resolve_source(str(tmp_path / "docs.jsonl"), text_field="body")
    assert list(src.documents()) == texts
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts[:5]):
        (txt_dir / f"{i}.txt").write_text(t)
    assert sorted(resolve_source(str(txt_dir)).documents()) == sorted(texts[:5])
    with pytest.raises(UserError, match="no field 'text'"):
        list(resolve_source(str(tmp_path / "docs.jsonl")).documents())


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="data file not found"):
        resolve_source(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="bad synthetic"):
        resolve_source("synthetic:colour=3")
    # Offline as on a cluster without internet: the libraries read these settings at import time.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot load dataset 'someone/nothing-here'"):
        list(resolve_source("someone/nothing-here").documents())


def test_too_few_documents(tmp_path):
    (tmp_path / "one.txt").write_text("a single document is not enough to split three ways")
    with pytest.raises(UserError, match="empty"):
        prepare_data(DataConfig(source=str(tmp_path / "one.txt"), vocab_size=300, cache_dir=str(tmp_path / "c")))


def test_batch_order_shards_the_global_batch():
    data = PackedSequences(np.arange(1000, dtype=np.uint16), seq_len=9)
    assert data.num_samples == 111
    single = BatchOrder(data, micro_batch=6, grad_accum=2, dp_size=1, dp_rank=0, seed=1)
    ranks = [BatchOrder(data, micro_batch=3, grad_accum=2, dp_size=2, dp_rank=r, seed=1) for r in range(2)]
    for position in (0, 12, 108):  # 108 crosses into the second epoch
        whole = sorted(single.sample_ids(position, 0) + single.sample_ids(position, 1))
        sharded = sorted(i for o in ranks for m in range(2) for i in o.sample_ids(position, m))
        assert whole == sharded
    epoch = [i for p in range(0, 111 - 111 % 12, 12) for m in range(2) for i in single.sample_ids(p, m)]
    assert len(set(epoch)) == len(epoch)  # no window repeats within an epoch
    inputs, targets = data.batch([2])
    assert inputs.tolist() == [list(range(18, 27))] and targets.tolist() == [list(range(19, 28))]


def test_validation_batches_are_fixed_and_shared():
    data = PackedSequences(np.arange(500, dtype=np.uint16), seq_len=4)
    seen = [x[:, 0].tolist() for r in range(2) for x, _ in validation_batches(data, 10, 3, 2, r)]
    assert sorted(sum(seen, [])) == [4 * i for i in range(10)]


def test_synthetic_corpus_is_seeded_and_scales():
    spec = SyntheticSpec(docs=30, entities=1500, seed=2)
    docs = list(generate_documents(spec))
    assert docs == list(generate_documents(spec)) and len(docs) == 30
    assert docs != list(generate_documents(SyntheticSpec(docs=30, entities=1500, seed=3)))


def test_tokenizer_keeps_newlines_and_spacing(prepared):
    sp = load_tokenizer(prepared.tokenizer_path)
    text = "Question: two lines\nAnswer:  spaced\n\nnext"
    assert sp.decode(sp.encode(text)) == text


@pytest.mark.parametrize("zipf", [0.8, 1.2])
def test_synthetic_entity_popularity_follows_the_zipf_option(zipf):
    """Mentions of a domain's entities, counted in its records: shares of the top ranks are
    1 / (rank ** zipf * H) with H = sum over ranks of rank ** -zipf (a direct computation)."""
    spec = SyntheticSpec.parse(f"synthetic:entities=50,zipf={zipf}")
    assert spec.zipf == zipf
    domain = build_world(spec)[0]
    rng, draws = random.Random(0), 20000
    counts = Counter(domain.record(rng).removeprefix("as for ").split(":")[0].split(",")[0] for _ in range(draws))
    harmonic = sum(rank ** -zipf for rank in range(1, 51))
    for rank in (1, 2, 5):
        share = counts[domain.entities[rank - 1]] / draws
        assert share == pytest.approx(1 / (rank ** zipf * harmonic), rel=0.08), (rank, share)
