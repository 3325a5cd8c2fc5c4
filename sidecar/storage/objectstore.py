"""An object store (S3 and S3-compatible, GCS, Azure) through obstore: streaming multipart upload with bounded
memory, create-only, streaming get, list, delete; transient errors retried with backoff (tenacity on top of
obstore's own per-request retries); every failure one line naming the store and the problem, never a secret."""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, PermissionDeniedError, UnauthenticatedError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from sidecar.storage.base import (
    CHUNK_SIZE,
    Chunks,
    Deleted,
    Hashing,
    ObjectExists,
    ObjectInfo,
    ObjectMissing,
    PutResult,
    StorageError,
    StoreUnusable,
    check_name,
    chunks_of,
    sha256_of,
)
from sidecar.storage.remote import RemoteConfig

if TYPE_CHECKING:
    from obstore import Attributes
    from obstore.store import ClientConfig, RetryConfig, S3Config, S3Credential
    from obstore.store import ObjectStore as ObstoreStore

log = logging.getLogger(__name__)
T = TypeVar("T")

PART_SIZE = 8 << 20        # multipart part size; memory is about PART_SIZE * (CONCURRENCY + 1)
CONCURRENCY = 4
SHA256_ATTRIBUTE = "sha256"  # user metadata (x-amz-meta-sha256): the object's sha256, when known before the upload
LOCK_WORDS = re.compile(r"retention|object ?lock|legal ?hold|immutab|WORM|locked", re.IGNORECASE)
CREDENTIAL_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
                    "InvalidClientTokenId", "AuthenticationFailed", "InvalidAuthenticationInfo", "AuthorizationHeaderMalformed",
                    "InvalidSecurity", "MissingSecurityHeader"}
MISSING_BUCKET_CODES = {"NoSuchBucket", "ContainerNotFound", "BucketNotFound"}
UNREACHABLE = re.compile(r"error sending request|connection refused|dns error|failed to lookup address|timed out|tcp connect error|"
                         r"connection reset|certificate|tls handshake|broken pipe|connection closed", re.IGNORECASE)


class _FileCredentials:
    """Static keys from secret files (a mounted Kubernetes Secret), re-read every few minutes so rotation works."""

    def __init__(self, key_file: Path, secret_file: Path, token_file: Path | None) -> None:
        self.key_file, self.secret_file, self.token_file = key_file, secret_file, token_file

    def __call__(self) -> S3Credential:
        try:
            return {"access_key_id": self.key_file.read_text().strip(), "secret_access_key": self.secret_file.read_text().strip(),
                    "token": self.token_file.read_text().strip() if self.token_file else None,
                    "expires_at": datetime.now(UTC) + timedelta(minutes=5)}
        except OSError as exc:
            raise StoreUnusable("credentials", f"cannot read the remote's credential file {exc.filename} ({exc.strerror})") from None


def build(remote: RemoteConfig, environ: Mapping[str, str] | None = None) -> ObstoreStore:
    """The obstore store for `remote`. Credentials come only from the standard environment of each cloud (read by
    obstore: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN
    (IRSA), AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (EKS Pod Identity), instance
    metadata; GOOGLE_* and the GKE metadata server; AZURE_* including AZURE_FEDERATED_TOKEN_FILE) or the secret files."""
    from obstore.store import AzureStore, GCSStore, S3Store

    del environ  # obstore reads the process environment itself; kept in the signature for the config's loader
    client: ClientConfig = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(hours=12), "read_timeout": timedelta(seconds=120),
                            "allow_http": remote.allow_http}
    retry: RetryConfig = {"max_retries": 4, "retry_timeout": timedelta(seconds=60),
                          "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5), "base": 2}}
    prefix = remote.prefix or None
    try:
        if remote.scheme == "s3":
            config: S3Config = {"checksum_algorithm": "sha256"}  # the server checks every request body against its sha256
            if remote.endpoint:
                config["endpoint"] = remote.endpoint
            if remote.region:
                config["region"] = remote.region
            if remote.sse:
                config["server_side_encryption"] = remote.sse
            if remote.kms_key_id:
                config["sse_kms_key_id"] = remote.kms_key_id
            provider = None
            if remote.access_key_id_file and remote.secret_access_key_file:
                provider = _FileCredentials(remote.access_key_id_file, remote.secret_access_key_file, remote.session_token_file)
            return S3Store(remote.bucket, prefix=prefix, config=config, client_options=client, retry_config=retry, credential_provider=provider)
        if remote.scheme == "gs":
            return GCSStore(remote.bucket, prefix=prefix, client_options=client, retry_config=retry)
        return AzureStore(remote.bucket, prefix=prefix, client_options=client, retry_config=retry)
    except BaseError as exc:
        raise StoreUnusable("credentials" if "missing" in str(exc).lower() or "credential" in str(exc).lower() else "bad-url",
                            f"remote {remote.url}: cannot set up the store ({_first_line(exc)}); check the credentials in the environment "
                            "(AWS_*, GOOGLE_*, AZURE_*) or BACKUP_REMOTE_*_FILE") from None


def _first_line(exc: BaseException) -> str:
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    line = re.sub(r"https?://\S+", "<url>", line)  # urls may carry presigned query strings; the store is named by us
    return line[:200]


class ObjectStore:
    """A Store over one bucket (and prefix). Names are flat; the prefix comes from the URL."""

    def __init__(self, remote: RemoteConfig, *, part_size: int = PART_SIZE, concurrency: int = CONCURRENCY, attempts: int = 4,
                 environ: Mapping[str, str] | None = None) -> None:
        self.remote = remote
        self.part_size = part_size
        self.concurrency = concurrency
        self.attempts = attempts
        self.last_error: BaseException | None = None  # what the last retried call met (for a caller that gives up waiting)
        self._store = build(remote, environ)
        self._attributes: Attributes = {"Storage-Class": remote.storage_class} if remote.storage_class else {}

    @property
    def description(self) -> str:
        return self.remote.url + (f" at {self.remote.endpoint}" if self.remote.endpoint else "")

    # --- errors and retries -----------------------------------------------------------------------

    def _error(self, exc: BaseException, op: str, name: str = "") -> StorageError:
        text = str(exc)
        status_match = re.search(r"status code: (\d{3})", text)
        status = int(status_match.group(1)) if status_match else None
        code_match = re.search(r"<Code>([A-Za-z]+)</Code>", text) or re.search(r"\b(" + "|".join(CREDENTIAL_CODES | MISSING_BUCKET_CODES) + r")\b", text)
        code = code_match.group(1) if code_match else ""
        where = f"remote {self.description}"
        what = f"{op} {name}".strip()
        if code in MISSING_BUCKET_CODES or (op in ("list", "put") and (status == 404 or isinstance(exc, FileNotFoundError))):
            return StoreUnusable("missing-bucket", f"{where}: bucket {self.remote.bucket!r} does not exist ({code or status}); "
                                                   "create it (with Object Lock if you want immutable backups) or fix BACKUP_REMOTE_URL")
        if isinstance(exc, FileNotFoundError):
            return ObjectMissing(f"{where}: {name} does not exist")
        if code in CREDENTIAL_CODES or isinstance(exc, UnauthenticatedError) or status == 401 or "missing secret" in text.lower() \
                or "credential" in text.lower() and status is None:
            return StoreUnusable("credentials", f"{where}: the server rejected the credentials ({code or status or 'no valid credentials'}); "
                                                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the web identity (IRSA, Pod Identity) or BACKUP_REMOTE_*_FILE")
        if isinstance(exc, PermissionDeniedError) or status == 403:
            return StoreUnusable("access-denied", f"{where}: access denied for {what} ({code or status}); the credentials work but lack "
                                                  "permission (list, get, put, delete on the bucket and prefix)")
        if UNREACHABLE.search(text):
            cause = UNREACHABLE.search(text)
            unreachable = StoreUnusable("unreachable", f"{where}: cannot reach the endpoint ({cause.group(0) if cause else 'no answer'}) during {what}; "
                                                 "check BACKUP_REMOTE_ENDPOINT / the region and the network (egress NetworkPolicy, proxy)")
            unreachable.transient = True
            return unreachable
        error = StorageError(f"{where}: {what} failed ({code + ' ' if code else ''}{status or _first_line(exc)})")
        error.transient = status is None or status >= 500 or status in (408, 429)
        return error

    def _call(self, op: str, name: str, action: Callable[[], T], *, attempts: int | None = None) -> T:
        """Run `action` with obstore's errors turned into StorageError, retrying transient ones with backoff."""
        def once() -> T:
            try:
                return action()
            except BaseError as exc:
                raise self._error(exc, op, name) from None
            except (FileNotFoundError, OSError) as exc:  # obstore raises FileNotFoundError for a missing object
                if isinstance(exc, FileNotFoundError):
                    raise self._error(exc, op, name) from None
                raise

        def before_sleep(state: RetryCallState) -> None:
            self.last_error = state.outcome.exception() if state.outcome else None
            log.warning("remote %s of %s failed (attempt %d), retrying: %s", op, name or "-", state.attempt_number, self.last_error or "")

        retrying = Retrying(stop=stop_after_attempt(attempts or self.attempts), wait=wait_exponential(multiplier=0.5, max=10), reraise=True,
                            retry=retry_if_exception(lambda exc: bool(getattr(exc, "transient", False))), before_sleep=before_sleep)
        return retrying(once)

    def check(self, attempts: int = 2) -> None:
        """Raise StoreUnusable naming the problem if the store cannot be listed (bad bucket, credentials, endpoint)."""
        def first_page() -> None:
            for _batch in obstore.list(self._store, chunk_size=1):
                break
        self._call("list", "", first_page, attempts=attempts)

    # --- the Store interface ----------------------------------------------------------------------

    def stat(self, name: str) -> ObjectInfo | None:
        check_name(name)
        try:
            meta = self._call("stat", name, lambda: obstore.head(self._store, name))
        except ObjectMissing:
            return None
        return ObjectInfo(name, meta["size"], meta["last_modified"])

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        def collect() -> list[ObjectInfo]:
            found = []
            for batch in obstore.list(self._store, chunk_size=1000):
                for meta in batch:
                    name = meta["path"]
                    if name.startswith(prefix) and "/" not in name and not name.startswith("."):
                        found.append(ObjectInfo(name, meta["size"], meta["last_modified"]))
            return found
        return sorted(self._call("list", prefix, collect), key=lambda info: info.name)

    def open_read(self, name: str) -> Iterator[bytes]:
        check_name(name)
        result = self._call("get", name, lambda: obstore.get(self._store, name))
        return self._stream(name, result.stream(min_chunk_size=CHUNK_SIZE))

    def _stream(self, name: str, stream: Iterable[Any]) -> Iterator[bytes]:
        try:
            for chunk in stream:
                yield bytes(chunk)
        except BaseError as exc:
            raise self._error(exc, "get", name) from None

    def delete(self, name: str) -> Deleted:
        check_name(name)
        if self.stat(name) is None:
            return Deleted.MISSING
        try:
            self._call("delete", name, lambda: obstore.delete(self._store, name))
        except StorageError as exc:
            # GCS retention policies, Azure immutability policies and version deletes under S3 Object Lock refuse;
            # that is the bucket keeping its promise, not a failure.
            if LOCK_WORDS.search(str(exc.__context__ or "")):
                log.info("remote object %s is kept by the bucket's lock or retention policy", name)
                return Deleted.KEPT_BY_LOCK
            raise
        return Deleted.DELETED

    def put_probe(self, name: str) -> None:
        """Write a small create-only object `name` under a hidden prefix such as `.check/` (outside the flat names
        backups use), once, no retry: what a backup's copy needs. StorageError if refused."""
        self._call("put", name, lambda: obstore.put(self._store, name, b"pg-backup-sidecar check\n", mode="create"), attempts=1)

    def delete_probe(self, name: str) -> Deleted:
        """Delete what put_probe wrote, once: DELETED, KEPT_BY_LOCK (refused by a lock), or StorageError."""
        try:
            self._call("delete", name, lambda: obstore.delete(self._store, name), attempts=1)
        except StorageError as exc:
            if LOCK_WORDS.search(str(exc.__context__ or exc)):
                return Deleted.KEPT_BY_LOCK
            raise
        return Deleted.DELETED

    def put_stream(self, name: str, data: Chunks, *, create_only: bool = True, sha256: str | None = None) -> PutResult:
        check_name(name)
        if create_only:
            existing = self.stat(name)
            if existing is not None:
                return self._same_or_refuse(existing, data, sha256)
        start = data.tell() if hasattr(data, "seek") and hasattr(data, "tell") and _seekable(data) else None

        def attempt() -> PutResult:
            if start is not None:
                data.seek(start)  # type: ignore[union-attr]
            return self._put_once(name, data, create_only, sha256)

        if start is None:  # a one-shot stream cannot be sent again: obstore's per-request retries are all it gets
            return self._call("put", name, attempt, attempts=1)
        return self._call("put", name, attempt)

    def _put_once(self, name: str, data: Chunks, create_only: bool, sha256: str | None) -> PutResult:
        hashing = Hashing(chunks_of(data, CHUNK_SIZE), name, sha256)
        chunks = iter(hashing)
        head: list[bytes] = []
        buffered = 0
        for chunk in chunks:  # read ahead one part: a small object goes in one atomic create-only PUT
            head.append(chunk)
            buffered += len(chunk)
            if buffered >= self.part_size:
                break
        attributes: Attributes = dict(self._attributes)
        if not hashing.done and buffered >= self.part_size:
            if sha256:
                attributes[SHA256_ATTRIBUTE] = sha256
            # Multipart: parts are uploaded as they fill and the object appears only at CompleteMultipartUpload; if the
            # stream raises (a source error, or the sha256 check at its end), obstore aborts the upload.
            obstore.put(self._store, name, itertools.chain(head, chunks), attributes=attributes, use_multipart=True,
                        chunk_size=self.part_size, max_concurrency=self.concurrency)
        else:
            body = b"".join(head)
            attributes[SHA256_ATTRIBUTE] = hashing.hexdigest()
            try:
                obstore.put(self._store, name, body, attributes=attributes, use_multipart=False, mode="create" if create_only else "overwrite")
            except AlreadyExistsError:  # written by someone else since our stat
                existing = self.stat(name)
                if existing is None:
                    raise
                return self._same_or_refuse(existing, [body], hashing.hexdigest())
        return PutResult(name, hashing.size, hashing.hexdigest())

    def _same_or_refuse(self, existing: ObjectInfo, data: Chunks, sha256: str | None) -> PutResult:
        """An object is already at the name: the same content is fine, different content is an error naming it."""
        if sha256 is None:
            sha256, _size = sha256_of(chunks_of(data))
        present, size = sha256_of(self.open_read(existing.name))
        if present != sha256:
            raise ObjectExists(f"remote {self.description}: {existing.name} already exists with different content "
                               f"(sha256 {present}, this one {sha256}); objects are never overwritten: remove it by hand if it is damaged")
        return PutResult(existing.name, size, present, existed=True)


def _seekable(data: object) -> bool:
    try:
        return bool(data.seekable())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def store_from_environment(environ: Mapping[str, str] | None = None) -> ObjectStore | None:
    """The configured remote store, or None (for tools and tests; the flows get it from the Config)."""
    from sidecar.storage.remote import parse_remote

    remote = parse_remote(os.environ if environ is None else environ)
    return ObjectStore(remote) if remote else None
