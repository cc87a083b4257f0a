"""The corpus a pipeline trains on, and who may write where (docs/contracts.md §1 and §8).

**Ownership.** maeclip never deletes or overwrites data it did not write. A URL that a corpus writer
(``shapes.py``, ``ingest.py``) writes into must be

- empty (or missing), or
- a corpus maeclip wrote: its ``manifest.json`` names our generator (``shapes-vN``, ``ingest-vN``), or
- a partial write of ours: no manifest yet, but the ``.maeclip-corpus`` marker, which every writer puts there
  before any other object (``{"generator": ...}``), so an ingest killed before its manifest is still ours.

Anything else (foreign objects, a manifest of another generator, a marker or manifest we cannot read) is
``CorpusInUse``, raised before anything is written or removed. The synthetic shapes corpus and ingested corpora
never overwrite each other: a writer of one family refuses a corpus of the other. The check reads the marker
and manifest first and then only asks whether the folder has any entry, so it stays cheap on a big bucket.

**Preparing a corpus** (``prepare_corpus``, the pipelines' corpus step), by ``kind``:

- ``shapes``: the synthetic corpus (``ensure_shapes``: written unless already there with the same seed and sizes);
- ``existing``: validated, never written: ``manifest.json`` readable, ``train`` and ``eval`` splits non-empty;
- ``ingest``: ``source_url`` ingested (idempotent: a rerun skips finished shards). A source laid out as
  ``SRC/train`` (and ``SRC/eval``) gives both splits; any other source is the train split, and its ``SRC/eval``
  sub-folder, when there (not for ``imagefolder``, whose sub-folders are classes), or ``eval_source_url`` is
  the eval split. The result is then validated like ``existing``, so a corpus without an eval split is refused
  with the command that ingests one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any

from trainer import storage
from trainer.data.loader import DataError, dataset_size

KINDS = ("shapes", "existing", "ingest")
MARKER = ".maeclip-corpus"
# Our own generators; the family decides who may write over whom.
_GENERATOR = re.compile(r"(shapes|ingest)-v[0-9]{1,6}")
# A marker is a few dozen bytes; a manifest lists shards and skipped keys, as large as an MDS index may be.
MARKER_LIMIT = 4 << 10
MANIFEST_LIMIT = 64 << 20
# storage.check_writable's probe: ours, and left behind only by a process killed between its write and delete.
_PROBE = ".maeclip-write-probe"
_SHOWN = 3


class CorpusInUse(DataError):
    """A corpus URL holding data maeclip did not write, or a corpus of the other writer; nothing was changed."""


def family(generator: Any) -> str | None:
    """``shapes`` or ``ingest`` for one of our generators, else None."""
    match = _GENERATOR.fullmatch(generator) if isinstance(generator, str) else None
    return match.group(1) if match else None


def _quoted(value: Any) -> str:
    """An untrusted value, cut to a bounded length for a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_manifest(url: str) -> dict[str, Any]:
    """``url/manifest.json`` as a dict (bounded read); DataError naming it when missing or unreadable."""
    manifest_url = storage.join(url, "manifest.json")
    if not storage.exists(manifest_url):
        raise DataError(f"no corpus at {url}: {manifest_url} is missing (write one with `maeclip data shapes "
                        f"--out {url}` or `maeclip data ingest SRC --format FMT --out {url}`)")
    return _read_json(manifest_url, MANIFEST_LIMIT)


def _read_json(url: str, limit: int) -> dict[str, Any]:
    try:
        found = json.loads(storage.read_text(url, limit=limit))
    except (ValueError, RecursionError) as err:  # too large (TooLarge), not UTF-8, not JSON, nested too deep
        raise DataError(f"unreadable {url}: {type(err).__name__}: {str(err)[:200]}") from err
    if not isinstance(found, dict):
        raise DataError(f"unreadable {url}: not a JSON object")
    return found


@dataclass(frozen=True)
class Ownership:
    """What a corpus URL holds: the generator that wrote it (None: nothing there), its manifest when complete,
    and the generator its marker names (None: no marker)."""

    generator: str | None
    manifest: dict[str, Any] | None
    marker: str | None


def _refuse(url: str, found: str) -> CorpusInUse:
    return CorpusInUse(f"{url} {found}; maeclip writes a corpus only into an empty URL or one holding a corpus "
                       "it wrote, and never deletes or overwrites data it did not write: choose another URL")


def inspect_corpus(url: str) -> Ownership:
    """Who wrote the corpus at ``url``; CorpusInUse when it holds anything that is not ours. Reads only."""
    manifest, marker = None, None
    marker_url, manifest_url = storage.join(url, MARKER), storage.join(url, "manifest.json")
    if storage.exists(marker_url):
        try:
            marker = _read_json(marker_url, MARKER_LIMIT).get("generator")
        except DataError as err:
            raise _refuse(url, f"holds a {MARKER} marker maeclip cannot read ({err})") from None
        if family(marker) is None:
            raise _refuse(url, f"holds a {MARKER} marker naming no maeclip generator ({_quoted(marker)})")
    if storage.exists(manifest_url):
        try:
            manifest = _read_json(manifest_url, MANIFEST_LIMIT)
        except DataError as err:
            raise _refuse(url, f"holds a manifest.json maeclip cannot read ({err})") from None
        generator = manifest.get("generator")
        if family(generator) is None:
            raise _refuse(url, f"holds a corpus of another writer (manifest.json generator {_quoted(generator)})")
        return Ownership(generator, manifest, marker)
    if marker is not None:  # a write of ours that has not reached its manifest yet
        return Ownership(marker, None, marker)
    entries = [name for name in storage.list_dir(url) if name != _PROBE]
    if entries:
        shown = ", ".join(_quoted(name) for name in entries[:_SHOWN])
        more = f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
        raise _refuse(url, f"is not empty and holds no maeclip corpus (found {shown}{more})")
    return Ownership(None, None, None)


def check_owner(url: str, generator: str) -> Ownership:
    """``inspect_corpus``, also refusing a corpus of the other family than ``generator``'s. Reads only."""
    owner = inspect_corpus(url)
    if owner.generator is not None and family(owner.generator) != family(generator):
        what = "an ingested corpus" if family(owner.generator) == "ingest" else "the synthetic shapes corpus"
        raise _refuse(url, f"holds {what} ({owner.generator}), which {generator} never writes over")
    return owner


def claim_corpus(url: str, generator: str) -> Ownership:
    """Check that ``generator`` may write at ``url``, that ``url`` is writable, then put the ownership marker
    there before anything else is written; return what was there before."""
    owner = check_owner(url, generator)
    storage.check_writable(url)
    if owner.marker != generator:
        storage.write_text(storage.join(url, MARKER), json.dumps({"generator": generator}))
    return owner


def _split_size(url: str, split: str, generator: Any) -> int:
    split_url = storage.join(url, split)
    if not storage.exists(storage.join(split_url, "index.json")):
        need = " (evaluation needs one)" if split == "eval" else ""
        option = "" if split == "train" else f" --split {split}"
        hint = f"ingest one with `maeclip data ingest SRC --format FMT --out {url}{option}`"
        if family(generator) == "shapes":
            hint = f"rewrite the shapes corpus with `maeclip data shapes --out {url}`"
        raise DataError(f"the corpus at {url} has no {split} split{need}: {split_url}/index.json is missing; {hint}")
    return dataset_size(split_url)


def validate_corpus(url: str) -> dict[str, int]:
    """Sizes of the train and eval splits of the corpus at ``url``; DataError naming the part that is missing,
    empty or unreadable. Reads only."""
    manifest = read_manifest(url)
    return {split: _split_size(url, split, manifest.get("generator")) for split in ("train", "eval")}


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise DataError(f"unknown corpus kind {_quoted(kind)} (kinds: {', '.join(KINDS)})")
    return kind


def check_corpus_target(kind: str, url: str) -> None:
    """The cheap pre-check of ``prepare_corpus(kind, url)``, raising the errors it would: for ``shapes`` and
    ``ingest`` whether the ownership rule refuses ``url``, for ``existing`` whether the corpus validates."""
    if _kind(kind) == "existing":
        validate_corpus(url)
        return
    from trainer.data import ingest, shapes  # they import this module for the ownership rule

    check_owner(url, shapes.GENERATOR_VERSION if kind == "shapes" else ingest.GENERATOR)


def _ingest_sources(source_url: str, source_format: str, eval_source_url: str) -> tuple[str, str]:
    """(train source, eval source or ""): the layout rule of the module docstring."""
    train, evaluation = storage.join(source_url, "train"), storage.join(source_url, "eval")
    if storage.exists(train):
        return train, eval_source_url or (evaluation if storage.exists(evaluation) else "")
    if not eval_source_url and source_format != "imagefolder" and storage.exists(evaluation):
        return source_url, evaluation
    return source_url, eval_source_url


def _prepare_ingest(url: str, source_url: str, source_format: str, eval_source_url: str,
                    options: dict[str, Any]) -> None:
    from trainer.data.ingest import IngestOptions, ingest

    if not source_url or not source_format:
        raise DataError("corpus kind 'ingest' needs source_url and source_format")
    on_error, workers = options.pop("on_error", "skip"), options.pop("workers", 1)
    known = {f.name for f in fields(IngestOptions)} - {"format", "split"}
    if unknown := sorted(set(options) - known):
        raise DataError(f"unknown ingest options {', '.join(unknown)} (known: on_error, workers, "
                        f"{', '.join(sorted(known))}); the splits are chosen by the source's layout")
    train_source, eval_source = _ingest_sources(source_url, source_format, eval_source_url)
    ingest(train_source, url, IngestOptions(format=source_format, split="train", **options), on_error=on_error,
           workers=workers)
    if eval_source:
        ingest(eval_source, url, IngestOptions(format=source_format, split="eval", **options), on_error=on_error,
               workers=workers)


def prepare_corpus(kind: str, url: str, *, source_url: str = "", source_format: str = "", n_train: int = 4096,
                   n_eval: int = 512, seed: int = 0, eval_source_url: str = "", **ingest_options: Any) -> str:
    """Make ``url`` hold a corpus of ``kind`` (``shapes``, ``existing``, ``ingest``; see the module docstring)
    and return ``url``. ``n_train``, ``n_eval`` and ``seed`` are the shapes corpus'; ``source_url``,
    ``source_format``, ``eval_source_url`` and ``ingest_options`` (``IngestOptions`` fields but the format and
    split, and ``on_error``, ``workers``) are ingest's. Options of the other kinds are ignored, so one call site
    serves every kind. DataError (CorpusInUse included) for what cannot be done, before anything is written."""
    if _kind(kind) == "shapes":
        from trainer.data.shapes import ensure_shapes

        return ensure_shapes(url, n_train=n_train, n_eval=n_eval, seed=seed)
    if kind == "ingest":
        _prepare_ingest(url, source_url, source_format, eval_source_url, dict(ingest_options))
    validate_corpus(url)
    return url
