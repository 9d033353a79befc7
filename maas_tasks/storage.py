"""The object store behind every MaaS artifact: snapshots, features, trained models, exported versions.

One small interface, two backends chosen by ``MAAS_STORE_URL``: a local directory (``file://DIR``,
the default) and an S3-compatible bucket (``s3://BUCKET[/PREFIX]``, MinIO in production) through
the ``minio`` SDK. Keys are ``/``-separated paths relative to the store root. Single writes are
atomic on both backends (a temporary file renamed into place; an S3 PUT), so a reader never sees a
half-written object. Multi-file artifacts are published with a manifest written last
(:func:`upload_tree`), which readers check before trusting the files (:func:`download_tree`).

Every S3 request is bounded: ``MAAS_S3_TIMEOUT`` seconds to connect and for each read, and a failed
request (refused, reset, a 5xx answer, a timeout) is sent again at most :data:`S3_RETRIES` times, so a
slow or dead store fails the task within a known time with a message naming the object, and Airflow's
retries take over.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

from maas_tasks.config import DEFAULT_S3_TIMEOUT, Settings, load_settings

if TYPE_CHECKING:
    import urllib3

MANIFEST_NAME = "MANIFEST.json"
_CHUNK = 1 << 20
# How many times a failed S3 request is sent again: a brief outage passes unnoticed, a dead or hung server
# fails the operation within about (1 + S3_RETRIES) x MAAS_S3_TIMEOUT (minio's own default: 5 retries of
# 5-minute timeouts, half an hour for one hung request).
S3_RETRIES = 2


class StoreError(RuntimeError):
    """A store operation failed; the message says which key, where, and what to check."""


class ObjectNotFound(StoreError, KeyError):
    """The requested key does not exist in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CorruptArtifact(StoreError):
    """A stored file differs from its tree's manifest: the artifact must be published again."""


class Store(Protocol):
    """What every backend provides. ``key`` arguments are relative, ``/``-separated paths."""

    url: str

    def uri(self, key: str) -> str: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def modified_at(self, key: str) -> datetime: ...


def check_key(key: str) -> str:
    """Validate a store key and return it normalised (no leading/trailing ``/``).

    Raises:
        StoreError: the key is empty or tries to leave the store root (``..``, absolute parts).
    """
    norm = key.strip("/")
    parts = norm.split("/")
    if not norm or any(p in ("", ".", "..") for p in parts) or "\\" in norm:
        raise StoreError(f"invalid store key {key!r}: use a relative path such as 'snapshots/abc/data.parquet'")
    return norm


def _check_prefix(prefix: str) -> str:
    return check_key(prefix) + "/" if prefix.strip("/") else ""


def s3_http_client(timeout: float) -> urllib3.PoolManager:
    """The HTTP client of an S3 store: ``timeout`` seconds to connect and for each read or write on the
    socket, :data:`S3_RETRIES` retries with a short backoff, certificates checked as minio checks them."""
    import certifi
    import urllib3

    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeout, read=timeout),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=S3_RETRIES, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


def _timed_out(exc: BaseException | None) -> bool:
    """Whether ``exc`` (as urllib3 wraps it: MaxRetryError(reason), ProtocolError(message, cause)) is a timeout."""
    from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    while exc is not None:
        if isinstance(exc, NewConnectionError):  # a refused connection (urllib3 files it under timeouts)
            return False
        if isinstance(exc, (Urllib3Timeout, TimeoutError)):
            return True
        if isinstance(exc, MaxRetryError):
            exc = exc.reason
        elif isinstance(exc, ProtocolError) and len(exc.args) > 1 and isinstance(exc.args[1], BaseException):
            exc = exc.args[1]
        else:
            exc = exc.__cause__ or exc.__context__
    return False


def _reason(exc: BaseException) -> str:
    """What went wrong, without urllib3's wrapping (``Max retries exceeded with url ... (Caused by ...)``)."""
    from urllib3.exceptions import MaxRetryError

    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        # "HTTPConnection(host='h', port=p): Failed to establish a new connection: ..." -> the part after "): "
        return f"{str(exc.reason).rsplit('): ', 1)[-1]}, after {S3_RETRIES} retries"
    return str(exc)


class FileStore:
    """A store rooted at a local directory; writes go to a temporary name and are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def uri(self, key: str) -> str:
        return f"file://{self._path(key)}"

    def _write_atomic(self, key: str, write) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(key, lambda fh: fh.write(data))

    def put_file(self, key: str, path: Path) -> None:
        def copy(fh) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, fh, _CHUNK)

        self._write_atomic(key, copy)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{self.uri(key)} does not exist") from None

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri(key)} does not exist")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        prefix = _check_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            if path.is_file() and ".tmp-" not in path.name:
                keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop directories the delete left empty, so a removed artifact leaves no trace.
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def modified_at(self, key: str) -> datetime:
        """When the object at ``key`` was last written (housekeeping spares what was written recently)."""
        try:
            return datetime.fromtimestamp(self._path(key).stat().st_mtime, timezone.utc)
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri(key)} does not exist") from None

    def temporary_files(self) -> list[Path]:
        """Files a writer left under their temporary names (it was killed before the rename)."""
        return sorted(p for p in self.root.rglob("*.tmp-*") if p.is_file()) if self.root.is_dir() else []


class S3Store:
    """A store in an S3-compatible bucket (MinIO, AWS S3, moto) through the ``minio`` SDK."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        region: str = "us-east-1",
        timeout: float = DEFAULT_S3_TIMEOUT,
    ) -> None:
        from minio import Minio

        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        if not parsed.hostname:
            raise StoreError(f"MAAS_S3_ENDPOINT={endpoint!r} has no host; use e.g. http://127.0.0.1:9000")
        self.bucket = bucket
        self.prefix = _check_prefix(prefix)
        self.endpoint = endpoint
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.timeout = timeout
        self._client = Minio(
            parsed.netloc,
            access_key=access_key,
            secret_key=secret_key,
            secure=parsed.scheme == "https",
            region=region,
            http_client=s3_http_client(timeout),
        )

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._name(key)}"

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        from minio.error import MinioException, S3Error
        from urllib3.exceptions import HTTPError

        where = self.uri(key) if key.strip("/") else self.url
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(f"{where} does not exist") from None
            if exc.code == "NoSuchBucket":
                raise StoreError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}: create it "
                    "(mc mb, or `maas stack up`, which creates it)"
                ) from None
            raise StoreError(f"{what} {where} failed at {self.endpoint}: {exc.code}: {exc.message}") from None
        except ValueError as exc:  # the SDK's checks of bucket and object names
            raise StoreError(
                f"{what} {where}: {exc}; S3 bucket names are 3-63 lowercase letters, digits, '-' or '.'"
            ) from None
        except (HTTPError, OSError, MinioException) as exc:
            if _timed_out(exc):
                raise StoreError(
                    f"{what} {where} timed out after {self.timeout:g} s at {self.endpoint} (gave up after "
                    f"{time.monotonic() - started:.1f} s, retries included); the store is slow or unreachable: "
                    "raise MAAS_S3_TIMEOUT or check the server"
                ) from None
            raise StoreError(
                f"{what} {where} failed: cannot reach {self.endpoint} ({_reason(exc)}); "
                "check MAAS_S3_ENDPOINT and that the server is up"
            ) from None

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (idempotent)."""
        if not self._call("checking bucket", "", self._client.bucket_exists, self.bucket):
            self._call("creating bucket", "", self._client.make_bucket, self.bucket)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("writing", key, self._client.put_object, self.bucket, self._name(key), io.BytesIO(data), len(data))

    def put_file(self, key: str, path: Path) -> None:
        self._call("uploading", key, self._client.fput_object, self.bucket, self._name(key), str(path))

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self._client.get_object(self.bucket, self._name(key))
            try:  # the body streams after the headers: a server dying or stalling now fails here
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("reading", key, read)

    def get_file(self, key: str, path: Path) -> None:
        # fget_object downloads to a temporary file and renames it, so `path` is never half-written.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._call("downloading", key, self._client.fget_object, self.bucket, self._name(key), str(path))

    def exists(self, key: str) -> bool:
        try:
            self._call("checking", key, self._client.stat_object, self.bucket, self._name(key))
        except ObjectNotFound:
            return False
        return True

    def list_keys(self, prefix: str = "") -> list[str]:
        prefix = _check_prefix(prefix)
        objects = self._call(
            "listing", prefix, lambda: list(
                self._client.list_objects(self.bucket, prefix=self.prefix + prefix, recursive=True)
            )
        )
        return sorted(o.object_name[len(self.prefix):] for o in objects if not o.is_dir)

    def delete(self, key: str) -> None:
        self._call("deleting", key, self._client.remove_object, self.bucket, self._name(key))

    def modified_at(self, key: str) -> datetime:
        """When the object at ``key`` was last written (housekeeping spares what was written recently)."""
        stat = self._call("checking", key, self._client.stat_object, self.bucket, self._name(key))
        return stat.last_modified


def open_store(url: str | None = None, settings: Settings | None = None) -> FileStore | S3Store:
    """Open the store named by ``url`` (default: ``MAAS_STORE_URL``). Opening touches nothing.

    Raises:
        StoreError: the URL is malformed or S3 settings are missing.
    """
    settings = settings or load_settings()
    url = url or settings.store_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc:
            raise StoreError(f"store URL {url!r} has a host part; use file:///absolute/dir (three slashes)")
        return FileStore(Path(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store URL {url!r} names no bucket; use s3://bucket[/prefix]")
        if not settings.s3_endpoint:
            raise StoreError(
                f"store URL {url!r} needs MAAS_S3_ENDPOINT (e.g. http://127.0.0.1:9000) "
                "with MAAS_S3_ACCESS_KEY and MAAS_S3_SECRET_KEY"
            )
        return S3Store(
            parsed.netloc,
            parsed.path,
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_region,
            settings.s3_timeout,
        )
    raise StoreError(f"store URL {url!r} is not supported; use file:///dir or s3://bucket[/prefix]")


def store_key(store: Store, uri: str) -> str:
    """The key of ``uri`` in ``store``: registry records hold URIs, the store reads keys."""
    base = store.uri("k")[:-1]  # every store's URI of a key is its base followed by the key
    if not uri.startswith(base):
        raise ValueError(f"{uri} is not in the configured store ({base}); point MAAS_STORE_URL at the store it is in")
    return uri[len(base):]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (artifacts can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def upload_tree(store: Store, local_dir: Path, prefix: str) -> dict[str, dict]:
    """Upload every file under ``local_dir`` to ``prefix/`` and publish a manifest last.

    The manifest (``prefix/MANIFEST.json``: relative path -> size and sha256) is the commit point:
    a reader that finds it knows every listed file was fully written.

    Returns:
        The manifest's ``files`` mapping.
    """
    local_dir = Path(local_dir)
    prefix = check_key(prefix)
    files: dict[str, dict] = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        if rel == MANIFEST_NAME:
            raise StoreError(f"{path} is named like the manifest; rename it before uploading {local_dir}")
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        store.put_file(f"{prefix}/{rel}", path)
    store.put_bytes(f"{prefix}/{MANIFEST_NAME}", json.dumps({"files": files}, indent=2, sort_keys=True).encode())
    return files


def read_manifest(store: Store, prefix: str) -> dict[str, dict]:
    """Return the ``files`` mapping of a tree published by :func:`upload_tree`.

    Raises:
        ObjectNotFound: the tree was never published (or its upload did not finish).
    """
    prefix = check_key(prefix)
    try:
        raw = store.get_bytes(f"{prefix}/{MANIFEST_NAME}")
    except ObjectNotFound:
        raise ObjectNotFound(
            f"{store.uri(prefix)} has no {MANIFEST_NAME}: it was never published or its upload did not finish"
        ) from None
    return json.loads(raw)["files"]


def download_tree(store: Store, prefix: str, local_dir: Path) -> dict[str, dict]:
    """Download a published tree into ``local_dir`` and verify every file against the manifest.

    Raises:
        ObjectNotFound: no manifest at ``prefix``, or a file it lists is missing.
        CorruptArtifact: a file's size or checksum differs from the manifest.
    """
    prefix = check_key(prefix)
    files = read_manifest(store, prefix)
    local_dir = Path(local_dir)
    for rel, meta in files.items():
        target = local_dir / check_key(rel)
        store.get_file(f"{prefix}/{rel}", target)
        if target.stat().st_size != meta["size"] or sha256_file(target) != meta["sha256"]:
            raise CorruptArtifact(
                f"{store.uri(prefix + '/' + rel)} does not match its manifest (size or sha256 differs); "
                "the stored artifact is corrupt: re-run the export"
            )
    return files


def delete_prefix(store: Store, prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many were deleted."""
    keys = store.list_keys(prefix)
    for key in keys:
        store.delete(key)
    return len(keys)
