"""The off-site store's configuration: a frozen RemoteConfig, parsed and validated with one line per bad key.

KEYS has the shape of sidecar.config.KEYS (config.yaml key -> (environment variable, parser)), so it can be
folded into the main configuration as it is."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sidecar.errors import ConfigError
from sidecar.values import boolean as _bool
from sidecar.values import int_at_least
from sidecar.values import text as _text


def _days(value: Any) -> int:  # 0 keeps everything
    parsed: int = int_at_least(0)(value)
    return parsed


SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az", "azure": "az"}
SSE_VALUES = ("AES256", "aws:kms")


@dataclass(frozen=True)
class RemoteConfig:
    url: str                                   # s3://bucket/prefix, gs://bucket/prefix, az://container/prefix
    endpoint: str | None = None                # S3-compatible endpoint (SeaweedFS, MinIO, R2...); None: the cloud's own
    region: str | None = None
    retention_days: int | None = None          # None: the local retention
    sse: str | None = None                     # AES256 | aws:kms
    kms_key_id: str | None = None
    storage_class: str | None = None
    allow_http: bool = False                   # only for a local test endpoint
    access_key_id_file: Path | None = None     # secret files (Kubernetes Secret volume); else the standard environment
    secret_access_key_file: Path | None = None
    session_token_file: Path | None = None

    @property
    def scheme(self) -> str:
        return SCHEMES[urlsplit(self.url).scheme]

    @property
    def bucket(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.strip("/")

    def masked(self) -> dict[str, Any]:
        """For validate-config --print: nothing here is a secret (secret files are shown by path only)."""
        return {
            "remote.url": self.url,
            "remote.endpoint": self.endpoint,
            "remote.region": self.region,
            "remote.retention_days": self.retention_days,
            "remote.sse": self.sse,
            "remote.kms_key_id": self.kms_key_id,
            "remote.storage_class": self.storage_class,
            "remote.allow_http": self.allow_http,
            "remote.access_key_id_file": str(self.access_key_id_file) if self.access_key_id_file else None,
            "remote.secret_access_key_file": str(self.secret_access_key_file) if self.secret_access_key_file else None,
            "remote.session_token_file": str(self.session_token_file) if self.session_token_file else None,
        }


Parser = Callable[[Any], Any]




BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,254}")


def _url(value: Any) -> str:
    text = _text(value)
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES:
        raise ValueError("must be s3://bucket/prefix, gs://bucket/prefix or az://container/prefix")
    if parts.username or parts.password or "@" in parts.netloc:
        raise ValueError("must not hold credentials; use the standard environment (AWS_ACCESS_KEY_ID...) or secret files")
    if not BUCKET.fullmatch(parts.netloc):
        raise ValueError(f"names no valid bucket ({parts.scheme}://BUCKET/prefix; lower-case letters, digits, '.', '-')")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment (?...#...); options have their own keys")
    segments = [s for s in parts.path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ValueError("prefix must not contain '.' or '..' segments")
    return f"{parts.scheme}://{parts.netloc}" + ("/" + "/".join(segments) if segments else "")


def _endpoint(value: Any) -> str:
    text = _text(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be http(s)://host[:port], e.g. https://s3.example.com")
    if parts.username or parts.password:
        raise ValueError("must not hold credentials; use the standard environment or secret files")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return text


def _region(value: Any) -> str:
    text = _text(value)
    if not re.fullmatch(r"[a-z0-9][a-z0-9\-]{1,40}", text):
        raise ValueError("must be a region name such as us-east-1 or eu-central-1")
    return text




def _sse(value: Any) -> str:
    text = _text(value)
    for accepted in SSE_VALUES:
        if text.lower() == accepted.lower():
            return accepted
    raise ValueError(f"accepted values: {', '.join(SSE_VALUES)}")


def _storage_class(value: Any) -> str:
    text = _text(value).upper()
    if not re.fullmatch(r"[A-Z][A-Z0-9_]{1,40}", text):
        raise ValueError("must be a storage class name such as STANDARD, STANDARD_IA, GLACIER_IR, NEARLINE, Cool")
    return text




def _readable_file(value: Any) -> Path:
    path = Path(_text(value))
    try:
        if not path.read_text().strip():
            raise ValueError("is empty")
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from None
    return path


# key in config.yaml -> (environment variable, parser); the RemoteConfig field is the key's last part
KEYS: dict[str, tuple[str, Parser]] = {
    "remote.url": ("BACKUP_REMOTE_URL", _url),
    "remote.endpoint": ("BACKUP_REMOTE_ENDPOINT", _endpoint),
    "remote.region": ("BACKUP_REMOTE_REGION", _region),
    "remote.retention_days": ("BACKUP_REMOTE_RETENTION_DAYS", _days),
    "remote.sse": ("BACKUP_REMOTE_SSE", _sse),
    "remote.kms_key_id": ("BACKUP_REMOTE_KMS_KEY_ID", _text),
    "remote.storage_class": ("BACKUP_REMOTE_STORAGE_CLASS", _storage_class),
    "remote.allow_http": ("BACKUP_REMOTE_ALLOW_HTTP", _bool),
    "remote.access_key_id_file": ("BACKUP_REMOTE_ACCESS_KEY_ID_FILE", _readable_file),
    "remote.secret_access_key_file": ("BACKUP_REMOTE_SECRET_ACCESS_KEY_FILE", _readable_file),
    "remote.session_token_file": ("BACKUP_REMOTE_SESSION_TOKEN_FILE", _readable_file),
}


def masked_value(text: str) -> str:
    """A value as it may be shown in an error: credentials written into a URL are replaced."""
    return re.sub(r"(//)[^/@\s]*@", r"\1****@", text)


def parse_remote(values: Mapping[str, Any]) -> RemoteConfig | None:
    """RemoteConfig from environment-style values (BACKUP_REMOTE_URL=...; os.environ works), None when no
    remote is configured. Every bad key is reported at once (ConfigError, one line each)."""
    problems: list[str] = []
    parsed: dict[str, Any] = {}
    for key, (variable, parser) in KEYS.items():
        raw = values.get(variable)
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            continue
        try:
            parsed[key.split(".", 1)[1]] = parser(raw)
        except ValueError as exc:
            shown = repr(masked_value(str(raw))) if isinstance(raw, (str, int, bool)) and len(str(raw)) < 200 else "(value)"
            problems.append(f"{variable}={shown}: {exc}")
    url_given = str(values.get(KEYS["remote.url"][0]) or "").strip() != ""
    problems += cross_checks(parsed, {k.split(".", 1)[1]: v for k, (v, _p) in KEYS.items()}, url_given)
    if problems:
        raise ConfigError(problems)
    if "url" not in parsed:
        return None
    return RemoteConfig(**parsed)


def cross_checks(fields: Mapping[str, Any], names: Mapping[str, str], has_url: bool) -> list[str]:
    """Problems between keys (`names` maps a field to how the user wrote its key, for the message)."""
    problems = []
    if not fields.get("url"):
        others = [names[f] for f in fields if f != "url"]
        if others and not has_url:
            problems.append(f"{others[0]} is set but {names['url']} is not; set {names['url']} (s3://bucket/prefix) or remove the remote settings")
        return problems
    scheme = SCHEMES[urlsplit(fields["url"]).scheme]
    if scheme != "s3":
        for field in ("endpoint", "region", "sse", "kms_key_id", "session_token_file", "access_key_id_file", "secret_access_key_file"):
            if fields.get(field) is not None:
                problems.append(f"{names[field]} applies to s3:// only; {scheme}:// uses its own credentials and settings (see the README)")
    if fields.get("kms_key_id") and fields.get("sse") != "aws:kms":
        problems.append(f"{names['kms_key_id']} needs {names['sse']}=aws:kms")
    if bool(fields.get("access_key_id_file")) != bool(fields.get("secret_access_key_file")):
        problems.append(f"{names['access_key_id_file']} and {names['secret_access_key_file']} go together; set both or neither")
    if fields.get("session_token_file") and not fields.get("access_key_id_file"):
        problems.append(f"{names['session_token_file']} needs {names['access_key_id_file']} and {names['secret_access_key_file']}")
    endpoint = fields.get("endpoint")
    if endpoint and endpoint.startswith("http://") and not fields.get("allow_http"):
        problems.append(f"{names['endpoint']}={endpoint!r} is plain http; use https, or set {names['allow_http']}=true for a local test endpoint")
    return problems
