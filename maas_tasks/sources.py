"""Sources: read a labeled data set from wherever it lives into one DataFrame of text columns.

Ingest (:mod:`maas_tasks.ingest`) snapshots what this module reads; validation then checks it. A source is
named by one string, so a DAG Param or ``maas run --data`` can hold any of them:

- a local file: CSV or TSV (plain or ``.gz``, quoted fields may hold newlines), Parquet, or JSON Lines
  (``.jsonl``/``.ndjson``, plain or ``.gz``); a directory (every data file under it, recursively, in path
  order; names starting with ``.`` or ``_``, such as ``.DS_Store`` or Spark's ``_SUCCESS``, are skipped, and
  so are files of other types); or a glob such as ``reviews/*.csv``. Several files make one data set and must
  have the same columns.
- the Large Movie Review Dataset's own layout: an ``aclImdb/`` directory (or its ``train/`` or ``test/``
  folder) or the ``aclImdb_v1.tar.gz`` tarball, streamed without unpacking. Columns ``text``, ``label``
  (``pos``/``neg``, from the folder), ``rating`` (from ``<n>_<rating>.txt``), ``id`` and ``split``. The file
  number repeats across folders, so ``id`` is ``<split>_<label>_<n>`` (e.g. ``train_pos_12``); ``unsup/`` is
  ignored.
- ``s3://bucket/prefix``: every data file under the prefix (or the one object it names, an aclImdb tarball
  included), through the minio SDK with the ``MAAS_S3_*`` settings.
- ``postgresql://user@host:port/db?table=reviews``, or the DSN with an SQL query, optionally read
  incrementally: only rows whose watermark column is greater than the last ingested value.

Every value is read as text (pandas ``"string"``) and an empty string is a missing value in every format, so
the same rows stored as CSV, Parquet or JSON Lines read to the same frame. A file whose bytes are mostly not
UTF-8 (a latin-1 export) is refused; a UTF-8 file with a few undecodable lines is read with each run of bad
bytes replaced by :data:`UNDECODABLE` (U+FFFD), which validation quarantines, so a few damaged rows do not
stop a run.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import io
import json
import logging
import re
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from maas_tasks.config import load_settings

if TYPE_CHECKING:
    import pandas as pd

    from maas_tasks.config import Settings

log = logging.getLogger(__name__)

TABULAR_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet", ".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
IMDB_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SUPPORTED_SUFFIXES = TABULAR_SUFFIXES + IMDB_SUFFIXES
# Validation quarantines a row holding this character in any column: it replaces bytes that were not UTF-8.
UNDECODABLE = "\ufffd"
# More undecodable lines (or reviews) than this share means the file is in another encoding, not damaged.
MAX_UNDECODABLE_FRACTION = 0.05
IMDB_COLUMNS = ("text", "label", "rating", "id", "split")
_IMDB_SPLITS = ("train", "test")
_IMDB_LABELS = ("neg", "pos")
_IMDB_FILE = re.compile(r"(\d+)_(\d+)\.txt")
_IMDB_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")
# Quoted user content in messages is cut to this many characters: an error is one short paragraph.
_QUOTE_LIMIT = 80
_SNIFF_BYTES = 8192
_DELIMITERS = {",": "comma", "\t": "tab", ";": "';'", "|": "'|'"}
_GZIP_MAGIC = b"\x1f\x8b"
# Leading bytes of files often misnamed as data files: (magic, what it is, what to do).
_MAGIC = (
    (_GZIP_MAGIC, "gzip-compressed", "name it {name}.gz"),
    (b"PAR1", "a Parquet file", "name it .parquet"),
    (b"\x89PNG\r\n\x1a\n", "binary (PNG image)", "pass the data export instead"),
    (b"\xff\xd8\xff", "binary (JPEG image)", "pass the data export instead"),
    (b"GIF8", "binary (GIF image)", "pass the data export instead"),
    (b"%PDF", "binary (PDF document)", "pass the data export instead"),
    (b"PK\x03\x04", "a ZIP archive (or an Excel/Office file)", "unzip it, or export the sheet as CSV"),
    (b"BZh", "bzip2-compressed", "decompress it (MaaS reads gzip)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it (MaaS reads gzip)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it (MaaS reads gzip)"),
    (b"SQLite format 3\x00", "binary (SQLite database)", "export the table as CSV"),
    (codecs.BOM_UTF16_LE, "UTF-16 text", "re-save it as UTF-8"),
    (codecs.BOM_UTF16_BE, "UTF-16 text", "re-save it as UTF-8"),
)


class IngestError(ValueError):
    """A source cannot be read as a data set; the message names it and says how to fix it."""


class SourceUnavailable(RuntimeError):
    """The server holding a source (S3, PostgreSQL) cannot be reached right now; a retry may succeed."""


@dataclass(frozen=True)
class Batch:
    """What one read of a source gave: the rows, and for an incremental read the highest watermark in them."""

    frame: pd.DataFrame
    watermark: tuple[str, str] | None = None


def _clip(text: str, limit: int = _QUOTE_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _names(values: list[str], limit: int = 5) -> str:
    shown = ", ".join(_clip(v, 40) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)


def _check_suffix(name: str) -> str:
    suffix = _suffix(name)
    if suffix is None:
        hint = "; a JSON file must hold one object per line and be named .jsonl" if name.lower().endswith(".json") else ""
        raise IngestError(
            f"{name}: unsupported file type; MaaS reads CSV or TSV (plain or .gz), Parquet, JSON Lines "
            f"(.jsonl/.ndjson, plain or .gz) and the aclImdb tarball (.tar.gz){hint}"
        )
    return suffix


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


# ---------------------------------------------------------------- bytes of one file -> frame


def _describe_binary(data: bytes) -> tuple[str, str] | None:
    head = data[:_SNIFF_BYTES]
    for magic, what, advice in _MAGIC:
        if head.startswith(magic):
            return what, advice
    if head[257:262] == b"ustar":
        return "a tar archive", "unpack it, or name an aclImdb tarball .tar.gz"
    if b"\x00" in head:
        return "binary (it holds NUL bytes)", "pass the data export instead"
    return None


def _refuse_binary(data: bytes, name: str, expected: str) -> None:
    found = _describe_binary(data)
    if found is not None:
        what, advice = found
        raise IngestError(f"{name} is not {expected}: this file is {what}; {advice.format(name=name)}")


def _gunzip(data: bytes, name: str) -> bytes:
    if not data.startswith(_GZIP_MAGIC):
        _refuse_binary(data, name, "gzip-compressed")
        raise IngestError(f"{name} is not gzip-compressed: name it {name[:-3]}, or compress it with gzip")
    try:
        return gzip.decompress(data)
    except EOFError:
        raise IngestError(
            f"{name} is truncated: its gzip data ends early (an interrupted download or copy?); fetch or compress it again"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise IngestError(f"{name} is a corrupt gzip file ({_clip(exc)}); fetch or compress it again") from None


def _decode(data: bytes, name: str, *, header: bool) -> str:
    """UTF-8 text of ``data``; a few damaged lines get :data:`UNDECODABLE`, another encoding is refused."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Slow path, only for files with bad bytes: find the lines holding them (surrogateescape keeps each byte).
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    bad = [number for number, line in enumerate(lines, 1) if _ESCAPED_BYTES.search(line)]
    total = sum(1 for line in lines if line.strip())
    first = ord(_ESCAPED_BYTES.search(lines[bad[0] - 1]).group()[0]) - 0xDC00
    where = f"byte 0x{first:02x} at line {bad[0]}"
    if (header and bad[0] == 1) or len(bad) > MAX_UNDECODABLE_FRACTION * total:
        raise IngestError(
            f"{name} is not UTF-8 ({where}; {len(bad)} of {total} lines have such bytes): it is in another "
            "encoding such as latin-1; re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        )
    log.warning(
        "%s: %d of %d lines hold bytes that are not UTF-8 (first: %s); they are read with %r in their place "
        "and validation quarantines those rows", name, len(bad), total, where, UNDECODABLE,
    )
    return _ESCAPED_BYTES.sub(UNDECODABLE, text)


def _refuse_other_text(text: str, name: str, kind: str) -> None:
    start = text[:_SNIFF_BYTES].lstrip()
    if start[:15].lower().startswith(("<!doctype html", "<html")):
        raise IngestError(f"{name} is not {kind}: this is an HTML page (a failed download?); fetch the data file again")
    if kind != "JSON Lines" and start[:1] in "{[":
        first_line = start.split("\n", 1)[0]
        try:
            one_object_per_line = isinstance(json.loads(first_line), dict)
        except ValueError:
            one_object_per_line = False
        if one_object_per_line:
            raise IngestError(f"{name} is not {kind}: this is JSON Lines (one JSON object per line); name it .jsonl")
        raise IngestError(
            f"{name} is not {kind}: this is JSON; write it as JSON Lines (one object per line) and name it .jsonl"
        )


def _header_row(text: str, sep: str) -> list[str]:
    # csv handles a quoted header; the first 64 kB hold any real header.
    return next(csv.reader(io.StringIO(text[:65536]), delimiter=sep), [])


def _check_delimiter(text: str, name: str, sep: str) -> None:
    header = text[: text.find("\n")] if "\n" in text[:65536] else text[:65536]
    if sep in header:
        return
    others = {d: header.count(d) for d in _DELIMITERS if d != sep and d in header}
    if not others:
        return
    found = max(others, key=others.get)
    if found == "\t":
        fix = "name it .tsv (or .tsv.gz)"
    elif found == ",":
        fix = "name it .csv (or .csv.gz)"
    else:
        fix = "re-save it with commas (.csv) or tabs (.tsv)"
    raise IngestError(
        f"{name} looks {_DELIMITERS[found]}-separated, not {_DELIMITERS[sep]}-separated (its header "
        f"{_clip(header)!r} has no {_DELIMITERS[sep]}): {fix}"
    )


def _parse_delimited(text: str, name: str, sep: str) -> pd.DataFrame:
    import pandas as pd

    _check_delimiter(text, name, sep)
    header = _header_row(text, sep)
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise IngestError(f"{name}: column(s) {_names(duplicates)} appear more than once in the header; rename them")
    try:
        with warnings.catch_warnings():
            # index_col=False: a row longer than the header is an error, never silently an index.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(
                io.StringIO(text), sep=sep, dtype="string", keep_default_na=False, na_values=[""], index_col=False,
            )
    except pd.errors.ParserWarning:
        raise IngestError(
            f"{name}: the first row has more fields than the header's {len(header)}; quote fields that contain "
            f"{_DELIMITERS[sep]}s"
        ) from None
    except pd.errors.ParserError as exc:
        message = str(exc)
        fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
        unclosed = re.search(r"EOF inside string starting at row (\d+)", message)
        if fields:
            expected, line, saw = fields.groups()
            problem = f"line {line} has {saw} fields where the header has {expected}; quote fields that contain {_DELIMITERS[sep]}s"
        elif unclosed:
            problem = f"a quoted field opened in row {unclosed.group(1)} is never closed; check its quotes"
        else:
            problem = f"cannot parse it ({_clip(message.removeprefix('Error tokenizing data. C error: '))})"
        raise IngestError(f"{name}: {problem}") from None


def _json_text(value: Any) -> str | None:
    # Numbers arrive as their text from the file (parse_int/parse_float); the rest is written back as JSON.
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _parse_jsonl(text: str, name: str) -> pd.DataFrame:
    import pandas as pd

    if text.lstrip().startswith("["):
        raise IngestError(f"{name} is a JSON array, not JSON Lines: write one JSON object per line")
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_int=str, parse_float=str, parse_constant=str)
        except ValueError as exc:
            raise IngestError(
                f"{name}: line {number} is not a JSON object ({getattr(exc, 'msg', exc)}); JSON Lines holds one "
                "complete object per line (a pretty-printed JSON document is not JSON Lines)"
            ) from None
        if not isinstance(record, dict):
            raise IngestError(f"{name}: line {number} is a JSON {type(record).__name__}, not an object")
        records.append({key: _json_text(value) for key, value in record.items()})
    return pd.DataFrame.from_records(records)


def _parse_parquet(data: bytes, name: str) -> pd.DataFrame:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not data.startswith(b"PAR1"):
        _refuse_binary(data, name, "Parquet")
        raise IngestError(f"{name} is not a Parquet file (it looks like text); name it after its format, e.g. .csv")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"{name}: cannot read it as Parquet ({_clip(exc)}); write the file again") from None
    # Arrow casts values to their text (an int64 column with nulls stays "1", not pandas' float "1.0");
    # nested values, which have no cast, become JSON. A stored index is a column like any other.
    columns = {}
    for field, column in zip(table.schema, table.columns):
        try:
            columns[field.name] = column.cast(pa.large_string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            columns[field.name] = pa.array([_json_text(v) for v in column.to_pylist()], type=pa.large_string())
    return pa.table(columns).to_pandas(types_mapper={pa.large_string(): pd.StringDtype()}.get)


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Every column as pandas ``string``, named by text, with empty strings as missing values."""
    frame = frame.astype("string")
    frame.columns = [str(c) for c in frame.columns]
    for column in frame.columns:
        values = frame[column]
        frame[column] = values.mask(values.eq("").fillna(False))
    return frame


def _blank(data: bytes) -> bool:
    # isspace() stops at the first other byte: no copy of a large file.
    return not data or data.isspace()


def _parse_data(data: bytes, name: str) -> pd.DataFrame:
    """Read the bytes of one CSV/TSV/Parquet/JSON Lines file (named ``name``, which gives its type).

    A file with a header and no rows gives a frame with columns and no rows, for validation to report.

    Raises:
        IngestError: the file is empty, of an unsupported type, not what its name says, or unparseable.
    """
    suffix = _check_suffix(name)
    if _blank(data):
        raise IngestError(f"{name} is empty: it has no header and no rows; check the export that wrote it")
    if suffix.endswith(".gz"):
        data = _gunzip(data, name)
        suffix = suffix[: -len(".gz")]
        if _blank(data):
            raise IngestError(f"{name} is empty once decompressed: it has no header and no rows")
    if suffix == ".parquet":
        return _normalise(_parse_parquet(data, name))
    kind = "JSON Lines" if suffix in (".jsonl", ".ndjson") else suffix[1:].upper()
    _refuse_binary(data, name, kind)
    text = _decode(data, name, header=kind != "JSON Lines")
    _refuse_other_text(text, name, kind)
    if kind == "JSON Lines":
        return _normalise(_parse_jsonl(text, name))
    return _normalise(_parse_delimited(text, name, "\t" if kind == "TSV" else ","))


def _combine_frames(parts: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """One frame from the frames of several files, in order, with the first file's column order.

    Raises:
        IngestError: a file's columns differ from the first file's; names both and the difference.
    """
    import pandas as pd

    first_name, first = parts[0]
    columns = list(first.columns)
    for name, frame in parts[1:]:
        if set(frame.columns) != set(columns):
            missing = [c for c in columns if c not in frame.columns]
            extra = [c for c in frame.columns if c not in columns]
            detail = "; ".join(
                part for part in (missing and f"missing {_names(missing)}", extra and f"extra {_names(extra)}") if part
            )
            raise IngestError(
                f"{name} has other columns than {first_name} ({detail}): every file of one source needs the same "
                "columns; fix that file or leave it out"
            )
    if len(parts) == 1:
        return first
    return pd.concat([frame[columns] for _, frame in parts], ignore_index=True)


# ---------------------------------------------------------------- aclImdb


def _decode_review(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), False


def _imdb_frame(records: list[tuple[str, str, int, str, str, bool]], name: str) -> pd.DataFrame:
    import pandas as pd

    if not records:
        raise IngestError(
            f"{name} holds no aclImdb reviews (train|test/pos|neg/<id>_<rating>.txt); pass the Large Movie Review "
            "Dataset's aclImdb folder or its aclImdb_v1.tar.gz"
        )
    undecodable = sum(1 for record in records if not record[5])
    if undecodable > MAX_UNDECODABLE_FRACTION * len(records):
        raise IngestError(
            f"{name} is not UTF-8: {undecodable} of {len(records)} reviews hold other bytes; re-save them as UTF-8"
        )
    if undecodable:
        log.warning("%s: %d reviews hold bytes that are not UTF-8; validation quarantines them", name, undecodable)
    # Folder and file order, so the directory and its tarball give the same rows in the same order.
    records.sort(key=lambda r: (r[0], r[1], r[2]))
    return pd.DataFrame(
        {
            "text": [r[4] for r in records],
            "label": [r[1] for r in records],
            "rating": [r[3] for r in records],
            "id": [f"{r[0]}_{r[1]}_{r[2]}" for r in records],
            "split": [r[0] for r in records],
        },
        columns=list(IMDB_COLUMNS),
        dtype="string",
    )


def _is_imdb_dir(path: Path) -> bool:
    if path.name in _IMDB_SPLITS and any((path / label).is_dir() for label in _IMDB_LABELS):
        return True
    return any((path / split / label).is_dir() for split in _IMDB_SPLITS for label in _IMDB_LABELS)


def _read_imdb_dir(path: Path, name: str) -> pd.DataFrame:
    splits = [(path.name, path)] if path.name in _IMDB_SPLITS else [(s, path / s) for s in _IMDB_SPLITS]
    records = []
    for split, folder in splits:
        for label in _IMDB_LABELS:
            if not (folder / label).is_dir():
                continue
            for file in (folder / label).iterdir():
                match = _IMDB_FILE.fullmatch(file.name)
                if match:
                    text, clean = _decode_review(file.read_bytes())
                    records.append((split, label, int(match.group(1)), match.group(2), text, clean))
    return _imdb_frame(records, name)


class _Rewound(io.RawIOBase):
    """A read-once stream (an S3 response) with the bytes already read to sniff its format put back in front.
    Its own ``closed`` is what buffering sees: a response closes itself once it has been read to the end."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._head[: len(buffer)] if self._head else (self._rest.read(len(buffer)) or b"")
        self._head = self._head[len(data):]
        buffer[: len(data)] = data
        return len(data)


def _tar_stream(fileobj: IO[bytes]) -> IO[bytes]:
    """The tar bytes of ``fileobj``: gunzipped by :class:`gzip.GzipFile` when it is gzip, which (unlike
    tarfile's own stream) raises EOFError when the compressed stream is cut short, wherever the cut falls."""
    head = fileobj.read(len(_GZIP_MAGIC))
    buffered = io.BufferedReader(_Rewound(head, fileobj))
    return gzip.GzipFile(fileobj=buffered, mode="rb") if head == _GZIP_MAGIC else buffered


def _read_imdb_tar(fileobj: IO[bytes], name: str) -> pd.DataFrame:
    records = []
    try:
        stream = _tar_stream(fileobj)
        # Stream mode ("r|*"): members are read in archive order, nothing is written to disk.
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                match = _IMDB_MEMBER.search(member.name)
                if match is None or not member.isfile():
                    continue
                text, clean = _decode_review(archive.extractfile(member).read())
                split, label, number, rating = match.groups()
                records.append((split, label, int(number), rating, text, clean))
        # A cut in the archive's zero padding ends the member list quietly: read to the end of the gzip
        # stream, so a truncated download is still found (its end-of-stream marker and CRC are missing).
        while stream.read(1 << 20):
            pass
    except (EOFError, tarfile.TarError, zlib.error, OSError) as exc:
        # tarfile reports a cut-off stream as "unexpected end of data" or a "truncated header".
        if isinstance(exc, EOFError) or re.search(r"unexpected end|truncated", str(exc)):
            raise IngestError(
                f"{name} is truncated: the archive ends early (an interrupted download?); fetch it again"
            ) from None
        raise IngestError(f"{name} is not a readable tar archive ({_clip(exc)}); fetch aclImdb_v1.tar.gz again") from None
    return _imdb_frame(records, name)


# ---------------------------------------------------------------- the sources


@dataclass(frozen=True)
class FileSource:
    """Local data files read as one data set (a file, the data files of a directory, or a glob's)."""

    name: str
    uri: str
    files: tuple[Path, ...]

    def read(self) -> Batch:
        parts = []
        for path in self.files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise IngestError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
            parts.append((str(path), _parse_data(data, str(path))))
        return Batch(_combine_frames(parts))


@dataclass(frozen=True)
class ImdbSource:
    """The Large Movie Review Dataset: an ``aclImdb`` directory (or one split of it) or its tarball."""

    name: str
    uri: str
    path: Path

    def read(self) -> Batch:
        if self.path.is_dir():
            return Batch(_read_imdb_dir(self.path, str(self.path)))
        try:
            with open(self.path, "rb") as fh:
                return Batch(_read_imdb_tar(fh, str(self.path)))
        except PermissionError as exc:
            raise IngestError(f"cannot read {self.path}: {exc.strerror}; check its permissions") from None


@dataclass(frozen=True)
class S3Source:
    """Every data file under an ``s3://bucket/prefix`` (or the single object it names)."""

    name: str
    uri: str
    bucket: str
    prefix: str
    settings: Settings | None = None

    def _client(self):
        from minio import Minio

        from maas_tasks.storage import s3_http_client

        settings = self.settings or load_settings()
        if not settings.s3_endpoint:
            raise IngestError(
                f"{self.uri}: reading s3:// needs MAAS_S3_ENDPOINT (e.g. http://127.0.0.1:9000) with "
                "MAAS_S3_ACCESS_KEY and MAAS_S3_SECRET_KEY"
            )
        endpoint = settings.s3_endpoint
        parsed = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        if not parsed.hostname:
            raise IngestError(f"MAAS_S3_ENDPOINT={endpoint!r} has no host; use e.g. http://127.0.0.1:9000")
        client = Minio(
            parsed.netloc, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
            secure=parsed.scheme == "https", region=settings.s3_region,
            http_client=s3_http_client(settings.s3_timeout),  # bounded, as the store's requests are
        )
        return client, endpoint

    def _call(self, endpoint: str, where: str, fn, *args, missing_ok: bool = False):
        """``fn(*args)`` with the SDK's failures as IngestError (the request is wrong) or SourceUnavailable."""
        from minio.error import MinioException, S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args)
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise IngestError(f"{where}: bucket {self.bucket!r} does not exist at {endpoint}; check the s3:// URI") from None
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                if missing_ok:
                    return None
                raise IngestError(f"{where} does not exist; check the s3:// URI") from None
            if exc.response is not None and exc.response.status >= 500:
                raise SourceUnavailable(f"{where}: {endpoint} failed ({exc.code}); try again") from None
            raise IngestError(
                f"cannot read {where}: {exc.code} ({_clip(exc.message or '')}); check the object's permissions "
                "and storage class (archived objects must be restored first)"
            ) from None
        except (MinioException, HTTPError, OSError) as exc:
            raise SourceUnavailable(
                f"{where}: cannot reach {endpoint} ({_clip(exc)}); check MAAS_S3_ENDPOINT and that the server is up"
            ) from None

    def _object_names(self, client, endpoint: str) -> list[str]:
        exact = self.prefix and not self.prefix.endswith("/")
        if exact and self._call(endpoint, self.uri, client.stat_object, self.bucket, self.prefix, missing_ok=True):
            _check_suffix(self.prefix)
            return [self.prefix]
        prefix = self.prefix.rstrip("/") + "/" if self.prefix else ""
        listed = self._call(
            endpoint, self.uri,
            lambda: [o.object_name for o in client.list_objects(self.bucket, prefix=prefix, recursive=True) if not o.is_dir],
        )
        names = sorted(
            name for name in listed
            if _suffix(name) in TABULAR_SUFFIXES and not any(_hidden(part) for part in name[len(prefix):].split("/"))
        )
        if not names:
            found = f"it holds {_names(sorted(listed))}" if listed else "it is empty"
            raise IngestError(
                f"{self.uri} holds no data files (CSV, TSV, Parquet or JSON Lines; {found}); check the bucket and prefix"
            )
        return names

    def read(self) -> Batch:
        from urllib3.exceptions import HTTPError

        client, endpoint = self._client()
        parts = []
        for object_name in self._object_names(client, endpoint):
            where = f"s3://{self.bucket}/{object_name}"
            response = self._call(endpoint, where, client.get_object, self.bucket, object_name)
            try:
                if _suffix(object_name) in IMDB_SUFFIXES:
                    return Batch(_read_imdb_tar(response, where))
                data = response.read()
            except (HTTPError, OSError) as exc:
                raise SourceUnavailable(f"reading {where} from {endpoint} broke off ({_clip(exc)}); try again") from None
            finally:
                response.close()
                response.release_conn()
            parts.append((where, _parse_data(data, where)))
        return Batch(_combine_frames(parts))


@dataclass(frozen=True)
class PostgresSource:
    """A PostgreSQL table or query, read whole or, with ``watermark_col``, only past ``after``.

    ``dsn`` is what psycopg2 connects with (it may hold a password); ``uri`` and ``name`` never do.
    """

    name: str
    uri: str
    dsn: str
    table: tuple[str, ...] | None = None
    query: str | None = None
    watermark_col: str | None = None
    after: str | None = None

    def _redact(self, message: str) -> str:
        import psycopg2.extensions

        password = psycopg2.extensions.parse_dsn(self.dsn).get("password")
        return message.replace(password, "***") if password else message

    def read(self) -> Batch:
        import pandas as pd
        import psycopg2
        from psycopg2 import errors as pg_errors
        from psycopg2 import sql

        try:
            conn = psycopg2.connect(self.dsn, connect_timeout=10, application_name="maas-ingest")
        except psycopg2.OperationalError as exc:
            detail = self._redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            if "authentication failed" in detail or "does not exist" in detail:
                raise IngestError(f"cannot read {self.name} from {self.uri}: {detail}; check the DSN") from None
            raise SourceUnavailable(f"cannot connect to {self.uri}: {detail}; check that the server is up") from None
        if self.table:
            base = sql.SQL("SELECT * FROM {}").format(sql.Identifier(*self.table))
        else:
            # Queries always run with a parameter tuple, so the query's own % (LIKE 'a%') is escaped.
            base = sql.SQL(self.query.strip().rstrip(";").replace("%", "%%"))
        source = sql.SQL("({}) AS maas_source").format(base)
        try:
            # Read-only: ingest never writes to the source database.
            conn.set_session(readonly=True)
            with conn, conn.cursor() as cur:
                cur.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(source), ())
                columns = [d.name for d in cur.description]
                duplicates = sorted({c for c in columns if columns.count(c) > 1})
                if duplicates:
                    raise IngestError(f"{self.name}: column(s) {_names(duplicates)} appear twice; alias them in the query")
                cur.execute(*self._select(source, columns))
                rows = cur.fetchall()
        except psycopg2.Error as exc:
            if isinstance(exc, pg_errors.UndefinedTable) and self.table:
                raise IngestError(
                    f"table {'.'.join(self.table)} does not exist in {self.uri.split('?', 1)[0]}; create it, or name "
                    "an existing table with ?table=NAME"
                ) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, psycopg2.OperationalError):
                raise SourceUnavailable(f"reading {self.name} from {self.uri} failed: {self._redact(_clip(first, 200))}") from None
            raise IngestError(f"{self.name} failed: {self._redact(_clip(first, 200))}; fix the query or the table") from None
        finally:
            conn.close()
        frame = pd.DataFrame(rows, columns=columns, dtype="string")
        watermark = (self.watermark_col, frame[self.watermark_col].iloc[-1]) if self.watermark_col and len(frame) else None
        return Batch(_normalise(frame), watermark)

    def _select(self, source, columns: list[str]):
        """The query reading every column as text (with a watermark: only the rows past it, in its order)."""
        from psycopg2 import sql

        text_columns = sql.SQL(", ").join(
            sql.SQL("{}::text AS {}").format(sql.Identifier(c), sql.Identifier(c)) for c in columns
        )
        if not self.watermark_col:
            return sql.SQL("SELECT {} FROM {}").format(text_columns, source), ()
        if self.watermark_col not in columns:
            raise IngestError(
                f"{self.name} has no watermark column {self.watermark_col!r}; its columns: {_names(columns, 10)}"
            )
        # Qualified: a bare name in ORDER BY would sort by the text output column of that name.
        mark = sql.Identifier("maas_source", self.watermark_col)
        where = sql.SQL("{} IS NOT NULL").format(mark)
        params: tuple[str, ...] = ()
        if self.after is not None:
            # An untyped literal takes the column's own type, so 10 > 9 compares as numbers, timestamps as
            # timestamps: the text stored in the registry is cast back by the column type's input function.
            where = sql.SQL("{} AND {} > %s").format(where, mark)
            params = (self.after,)
        query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}").format(text_columns, source, where, mark)
        return query, params


Source = FileSource | ImdbSource | S3Source | PostgresSource


def _open_postgres(source: str, table_query: str | None, watermark_col: str | None) -> PostgresSource:
    import psycopg2.extensions

    parts = urlsplit(source)
    params = parse_qsl(parts.query, keep_blank_values=True)
    tables = [value for key, value in params if key == "table"]
    dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in params if k != "table"])))
    try:
        conninfo = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        raise IngestError(
            "the PostgreSQL source is not a valid URL; use postgresql://user@host:port/db?table=NAME"
        ) from None
    user = f"{conninfo['user']}@" if conninfo.get("user") else ""
    base = f"postgresql://{user}{conninfo.get('host', '')}:{conninfo.get('port') or 5432}/{conninfo.get('dbname', '')}"
    if bool(tables) == bool(table_query):
        raise IngestError(
            f"{base}: name exactly one of a table (postgresql://...?table=NAME) and a query (table_query)"
        )
    if tables:
        table = tuple(tables[0].split("."))
        if not all(table) or len(table) > 2:
            raise IngestError(f"{base}: table {tables[0]!r} is not a table name; use ?table=NAME or ?table=SCHEMA.NAME")
        return PostgresSource(
            name=f"table {tables[0]}", uri=f"{base}?table={tables[0]}", dsn=dsn, table=table,
            watermark_col=watermark_col,
        )
    digest = hashlib.sha256(table_query.strip().encode()).hexdigest()[:16]
    return PostgresSource(
        name=f"query {digest[:8]} on {conninfo.get('dbname', '')}", uri=f"{base}?query={digest}", dsn=dsn,
        query=table_query, watermark_col=watermark_col,
    )


def _data_files(paths: list[Path]) -> list[Path]:
    return sorted((p for p in paths if p.is_file() and _suffix(p.name) in TABULAR_SUFFIXES), key=lambda p: p.as_posix())


def _open_local(source: str) -> FileSource | ImdbSource:
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.exists() and _GLOB_CHARS.search(str(path)):
        pattern = str(path)
        files = _data_files([Path(p) for p in glob.glob(pattern, recursive=True)])
        if not files:
            raise IngestError(f"{pattern} matches no data files (CSV, TSV, Parquet or JSON Lines); check the pattern")
        return FileSource(name=pattern, uri=str(Path(pattern).absolute()), files=tuple(files))
    if path.is_dir():
        if _is_imdb_dir(path):
            resolved = path.resolve()
            name = f"{resolved.parent.name}/{resolved.name}" if resolved.name in _IMDB_SPLITS else resolved.name
            return ImdbSource(name=name, uri=str(resolved), path=path)
        candidates = [
            p for p in path.rglob("*")
            if not any(_hidden(part) for part in p.relative_to(path).parts)
        ]
        files = _data_files(candidates)
        if not files:
            others = sorted(p.relative_to(path).as_posix() for p in candidates if p.is_file())
            found = f"it holds {_names(others)}" if others else "it is empty"
            raise IngestError(
                f"directory {path} holds no data files (CSV, TSV, Parquet or JSON Lines; {found}); pass a directory "
                "of data files, a file, or an aclImdb folder"
            )
        return FileSource(name=f"{path.resolve().name}/", uri=str(path.resolve()), files=tuple(files))
    if not path.exists():
        raise IngestError(f"{path} does not exist; pass an existing data file, directory or glob")
    suffix = _check_suffix(path.name)
    if suffix in IMDB_SUFFIXES:
        return ImdbSource(name=path.name, uri=str(path.resolve()), path=path)
    return FileSource(name=path.name, uri=str(path.resolve()), files=(path,))


def open_source(
    source: str | Path,
    *,
    table_query: str | None = None,
    watermark_col: str | None = None,
    settings: Settings | None = None,
) -> Source:
    """Name what ``source`` is, without reading its rows: cheap enough to check a source before a run.

    Local paths are resolved and listed (a missing path, a directory without data files or an unsupported
    suffix fail here); ``s3://`` and ``postgresql://`` sources are only parsed, not contacted.

    Args:
        source: a file, directory, glob, aclImdb directory or tarball, ``s3://bucket/prefix``, or
            ``postgresql://user@host:port/db?table=NAME`` (the DSN may hold a password; it is never shown).
        table_query: with a ``postgresql://`` DSN and no ``?table=``: the SQL query to read.
        watermark_col: PostgreSQL only: read only rows whose column is past the last ingested value.
        settings: the ``MAAS_S3_*`` settings for ``s3://`` (default: the environment's, read at read time).

    Raises:
        IngestError: the source cannot be used as given; the message says why and what to pass.
    """
    text = str(source)
    if text.startswith(("postgresql://", "postgres://")):
        return _open_postgres(text, table_query, watermark_col)
    if table_query or watermark_col:
        raise IngestError(
            f"{'table_query' if table_query else 'watermark_col'} applies to PostgreSQL sources only "
            "(postgresql://...); leave it empty for files and s3://"
        )
    if text.startswith("s3://"):
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if not bucket:
            raise IngestError(f"{text} names no bucket; use s3://bucket/prefix")
        uri = f"s3://{bucket}/{prefix}".rstrip("/")
        return S3Source(name=uri, uri=uri, bucket=bucket, prefix=prefix, settings=settings)
    return _open_local(text)


def check_source(
    source: str | Path, *, table_query: str | None = None, watermark_col: str | None = None
) -> str:
    """Check ``source`` as :func:`open_source` does (no rows read, no server contacted) and return it as a
    task on another machine or working directory must get it: a local path or glob made absolute, an
    ``s3://`` or ``postgresql://`` source unchanged.

    Raises:
        IngestError: the source cannot be used as given (a missing path, a directory without data files,
            an unsupported suffix, a malformed DSN); the message says what to pass.
    """
    opened = open_source(source, table_query=table_query, watermark_col=watermark_col)
    return opened.uri if isinstance(opened, FileSource | ImdbSource) else str(source)
