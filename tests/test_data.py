"""Data: sources and their validation, token streams, packing, held-out splits, batch order and resume."""

import json

import datasets
import huggingface_hub.constants
import pytest
import torch
from conftest import build_tokenizer
from pydantic import ValidationError

from reattend.data import (
    DataConfig,
    DataError,
    DataSource,
    build_splits,
    iterate_batches,
    kjv_documents,
    load_documents,
    pack_blocks,
    python_docs_documents,
    tokenize_stream,
)

LINES = [f"line {i} of the local text, with words that repeat." for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


def test_pack_blocks_drops_the_ragged_tail():
    blocks = pack_blocks(torch.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack_blocks(torch.arange(3), 4).shape == (0, 4)


def test_tokenize_stream_joins_documents_with_eos(tok):
    stream = tokenize_stream(["the tool", "a model"], tok)
    first, second = (tok(t, add_special_tokens=False)["input_ids"] for t in ("the tool", "a model"))
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == first + [tok.eos_token_id] + second


def test_splits_hold_out_the_tail_documents_never_trained_on(text_file, tok, monkeypatch):
    cfg = DataConfig(source={"kind": "text", "path": str(text_file)}, block_size=8, heldout_fraction=0.1,
                     extra_eval=[{"name": "same-file", "kind": "text", "path": str(text_file), "max_documents": 3}])
    splits = build_splits(cfg, tok)
    assert list(splits.heldout) == ["text-heldout", "same-file"]
    # The held-out stream is exactly the last 10% of the documents; training blocks are the stream before it.
    assert splits.heldout["text-heldout"].tolist() == tokenize_stream(LINES[36:], tok).tolist()
    train = splits.train.flatten().tolist()
    assert train == tokenize_stream(LINES[:36], tok)[: len(train)].tolist()
    assert splits.train.shape[1] == 8 and len(train) > 0.8 * len(tokenize_stream(LINES[:36], tok))
    assert splits.heldout["same-file"].tolist() == tokenize_stream(LINES[:3], tok).tolist()
    monkeypatch.setattr("reattend.data.load_documents", None)  # a second build reads from the cache
    assert torch.equal(build_splits(cfg, tok).train, splits.train)


def test_too_little_text_for_a_block_says_what_to_change(text_file, tok):
    cfg = DataConfig(source={"kind": "text", "path": str(text_file), "max_documents": 2}, block_size=4096,
                     extra_eval=[])
    with pytest.raises(DataError, match="block_size 4096"):
        build_splits(cfg, tok)


def test_missing_file_error_names_the_field_and_value(tmp_path):
    with pytest.raises(ValidationError) as err:
        DataConfig(source={"kind": "json", "path": str(tmp_path / "nope.jsonl")})
    message = str(err.value)
    assert "source.path" in message and "nope.jsonl" in message and "no such file" in message
    with pytest.raises(ValidationError, match="path is missing"):
        DataSource(kind="parquet")


@pytest.mark.parametrize("bad", [
    {"source": {"kind": "kjv", "colour": "red"}},
    {"blocksize": 64},
    {"extra_eval": [{"name": "x", "kind": "kjv", "shuffle": True}]},
])
def test_unknown_keys_are_refused(bad):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DataConfig(**bad)


@pytest.mark.parametrize("bad, match", [
    ({"block_size": 4}, "block_size"),
    ({"heldout_fraction": 0.0}, "heldout_fraction"),
    ({"heldout_fraction": 0.5}, "heldout_fraction"),
    ({"source": {"kind": "kjv", "path": "bible.txt"}}, "not used by kind 'kjv'"),
    ({"source": {"kind": "hub"}}, "needs the data set name"),
    ({"extra_eval": [{"name": "kjv-heldout", "kind": "python_docs"}]}, "used twice"),
])
def test_bad_values_are_refused(bad, match):
    with pytest.raises(ValidationError, match=match):
        DataConfig(**bad)


def test_json_parquet_and_text_files_load_in_order(tmp_path, text_file):
    rows = [{"body": f"row {i}", "id": i} for i in range(5)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    expected = [r["body"] for r in rows]
    assert load_documents(DataSource(kind="json", path=str(jsonl), text_field="body")) == expected
    assert load_documents(DataSource(kind="parquet", path=[str(parquet)], text_field="body",
                                     max_documents=2)) == expected[:2]
    assert load_documents(DataSource(kind="text", path=str(text_file))) == LINES
    with pytest.raises(DataError, match=r"text_field 'text'.*\['body', 'id'\]"):
        load_documents(DataSource(kind="json", path=str(jsonl)))


def test_hub_source_offline_gives_a_clear_error(monkeypatch):
    # Offline mode fails at once instead of retrying a network this machine may not have.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-org/no-such-data.*offline.*kind: text/json/parquet"):
        load_documents(DataSource(kind="hub", path="no-such-org/no-such-data"))


def test_kjv_is_the_bible_by_chapter_without_verse_numbers():
    chapters = kjv_documents()
    assert len(chapters) == 1189
    assert chapters[0].startswith("In the beginning God created the heavens and the earth.\nAnd the earth")
    assert chapters[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert not any(c[0].isdigit() and ":" in c[:8] for c in chapters)
    assert load_documents(DataSource(kind="kjv", max_documents=3)) == chapters[:3]


def test_python_docs_are_real_deterministic_stdlib_docstrings():
    docs = python_docs_documents()
    assert docs == python_docs_documents()
    text = "\n".join(docs)
    assert 100_000 < len(text) < 2_000_000
    assert "Module json" in text and "json.dumps(" in text and "Serialize ``obj``" in text


def test_batches_are_deterministic_cover_each_epoch_and_resume_exactly():
    blocks = torch.arange(7 * 4).view(7, 4)
    run = list(iterate_batches(blocks, batch_size=3, max_tokens=3 * 4 * 10, seed=1))
    assert [s for s, _ in run] == list(range(10))
    assert all(b.shape == (3, 4) for _, b in run)
    order = torch.cat([b[:, 0] // 4 for _, b in run])
    assert sorted(order[:7].tolist()) == list(range(7)) and sorted(order[7:14].tolist()) == list(range(7))
    again = list(iterate_batches(blocks, batch_size=3, max_tokens=3 * 4 * 10, seed=1))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(run, again))
    other = torch.cat([b for _, b in iterate_batches(blocks, 3, 3 * 4 * 10, seed=2)])
    assert not torch.equal(other, torch.cat([b for _, b in run]))
    for start in (1, 2, 5, 9):
        resumed = list(iterate_batches(blocks, 3, 3 * 4 * 10, seed=1, start_step=start))
        assert [s for s, _ in resumed] == list(range(start, 10))
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, run[start:]))
    assert len(list(iterate_batches(blocks, 3, 5, seed=0))) == 1
