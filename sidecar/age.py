"""age encryption (age-encryption.org/v1, X25519 recipients), streaming, through pyrage (bindings to rage).

Files written here open with the stock `age -d -i key.txt`, and files from `age -r age1...` open here.
Only what a backup tool needs: X25519 recipients and identities (no passphrases, plugins or SSH keys).
rage does the format; this module adds what a backup needs around it: keys checked when the
configuration is read, age's identity file format, one-line errors instead of tracebacks, a bound on a
header that never ends, and errors of the files we read from or write to never swallowed.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, cast

import pyrage
from pyrage import x25519

from sidecar.errors import SidecarError

Identities = list[x25519.Identity]
MAGIC = b"age-encryption.org/v1"
HEADER_LIMIT = 1 << 20  # a header with thousands of recipients is a few hundred KiB
BATCH = 1 << 20  # rage reads and writes 8 KiB at a time; we hand the files 1 MiB


class AgeError(SidecarError):
    pass


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


# --- keys -----------------------------------------------------------------------------------------

_P = 2**255 - 19
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _bech32_payload(text: str) -> bytes:
    """The 32-byte payload of a bech32 string (checksum verified by rage before we get here)."""
    data = [_CHARSET.index(c) for c in text.lower()[text.rfind("1") + 1 : -6]]
    acc = bits = 0
    out = bytearray()
    for value in data:
        acc = (acc << 5) | value
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    return bytes(out)


def _is_low_order(public: bytes) -> bool:
    """True for the X25519 points whose shared secret is all zeros (RFC 7748 ladder with the cofactor 8).

    age refuses them (the share would be known to anyone); rage panics on them when encrypting."""
    u = int.from_bytes(public, "little") & ((1 << 255) - 1)
    x1, x2, z2, x3, z3, swap = u % _P, 1, 0, u % _P, 1, 0
    for t in reversed(range(4)):  # the scalar 8 = 0b1000
        bit = (8 >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b, c, d = x2 + z2, x2 - z2, x3 + z3, x3 - z3
        aa, bb, da, cb = a * a, b * b, d * a, c * b
        e = aa - bb
        x3, z3 = (da + cb) ** 2 % _P, x1 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + 121665 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return x2 * pow(z2, _P - 2, _P) % _P == 0


def parse_recipient(text: str) -> x25519.Recipient:
    """An age X25519 public key (age1...); ValueError naming the problem otherwise (for config validation)."""
    text = text.strip()
    shown = f"{text[:12]}..." if len(text) > 12 else repr(text)
    if not text.lower().startswith("age1"):
        raise ValueError(f"{shown} is not an age X25519 public key (age1...); only X25519 recipients are supported")
    try:
        recipient = x25519.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise ValueError(f"{shown} is not a valid age public key ({exc}); copy it from age-keygen -y key.txt") from None
    if _is_low_order(_bech32_payload(text)):
        raise ValueError(f"{shown} is a low-order X25519 point, not a real public key (anyone could decrypt); use the key from age-keygen -y key.txt")
    return recipient


def parse_identities(path: Path) -> Identities:
    """An age identity file: AGE-SECRET-KEY-1... lines, `#` comments and blank lines, one or more keys."""
    hint = "set BACKUP_ENCRYPTION_IDENTITY_FILE to the age secret key file (age-keygen -o key.txt)"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgeError(f"age identity file {path}: cannot read it ({exc.strerror}); {hint}") from None
    try:
        lines = data.decode().splitlines()
    except UnicodeDecodeError:
        raise AgeError(f"age identity file {path}: not text; {hint}") from None
    keys = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("AGE-PLUGIN-") or line.upper().startswith("AGE-SECRET-KEY-PQ-"):
            raise AgeError(f"age identity file {path}: line {number} is a plugin or post-quantum identity; only X25519 keys (AGE-SECRET-KEY-1...) are supported")
        try:
            keys.append(x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise AgeError(f"age identity file {path}: line {number} is not an AGE-SECRET-KEY-1... key; {hint}") from None
    if not keys:
        raise AgeError(f"age identity file {path}: holds no AGE-SECRET-KEY-1... key; {hint}")
    return keys


def generate_identity() -> tuple[str, str]:
    """A new (secret key, public key) pair in age's text form."""
    key = x25519.Identity.generate()
    return str(key), str(key.to_public())


# --- streams --------------------------------------------------------------------------------------

_B64 = re.compile(rb"[A-Za-z0-9+/]*")
_ARG = re.compile(rb"[\x21-\x7e]+")


def _canonical_b64(text: bytes) -> bool:
    if not _B64.fullmatch(text) or len(text) % 4 == 1:
        return False
    return base64.b64encode(base64.b64decode(text + b"=" * (-len(text) % 4))).rstrip(b"=") == text


def _check_header(header: bytes) -> None:
    """age's header grammar, strictly (rage is lenient about stanza bodies): the version line, stanzas of
    `-> arg...` and base64 body lines of 64 columns ending with a shorter one, then `--- <mac>`."""
    lines = header.split(b"\n")
    if lines[0] != MAGIC:
        raise AgeError("not an age file (it must start with the age-encryption.org/v1 line; armored files are not supported)")
    i = 1
    while lines[i].startswith(b"->"):
        args = lines[i][2:].split(b" ")
        if args[0] != b"" or len(args) < 2 or not all(_ARG.fullmatch(arg) for arg in args[1:]):
            raise AgeError("age header: malformed recipient stanza line: the file is damaged")
        i += 1
        while True:
            body = lines[i]
            if len(body) > 64 or not _canonical_b64(body):
                raise AgeError("age header: malformed stanza body: the file is damaged")
            i += 1
            if len(body) < 64:
                break
    if i != len(lines) - 2 or not lines[i].startswith(b"--- ") or len(lines[i]) != 47 or not _canonical_b64(lines[i][4:]) or lines[-1] != b"":
        raise AgeError("age header: malformed (expected a recipient stanza or the --- MAC line): the file is damaged")


class _Source:
    """What rage reads: keeps our reader's own exception; checks the header strictly before rage sees
    its end, and refuses a header that never ends instead of buffering it."""

    def __init__(self, reader: Readable, check_header: bool) -> None:
        self._reader = reader
        self._buffer = memoryview(b"")
        self._header: bytearray | None = bytearray() if check_header else None
        self.error: BaseException | None = None

    def _fill(self) -> None:
        data = self._reader.read(BATCH)
        self._buffer = memoryview(data)
        if self._header is None:
            return
        self._header += data
        end = self._header.find(b"\n---")
        end = self._header.find(b"\n", end + 1) if end >= 0 else -1
        if end >= 0:
            _check_header(bytes(self._header[: end + 1]))
            self._header = None
        elif not data:
            raise AgeError("age file ends inside its header: the file is truncated or not an age file")
        elif len(self._header) > HEADER_LIMIT:
            raise AgeError(f"not an age file or a damaged one: no end of the age header within its first {HEADER_LIMIT >> 20} MiB")

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            raise self.error
        try:
            if not self._buffer:
                self._fill()
            size = len(self._buffer) if size < 0 else size
            data = bytes(self._buffer[:size])
            self._buffer = self._buffer[size:]
        except BaseException as exc:
            self.error = exc
            raise
        return data

    def readable(self) -> bool:
        return True


class _Sink:
    """What rage writes to: batches its 8 KiB writes, keeps our writer's own exception.

    rage writes its last bytes while dropping its buffer and ignores errors there, so `close()` (after
    rage returns) writes what is left and raises any error the writer had."""

    def __init__(self, writer: Writable) -> None:
        self._writer = writer
        self._pending = bytearray()
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        self._pending += data
        if len(self._pending) >= BATCH:
            self._push()
        return len(data)

    def _push(self) -> None:
        data, self._pending = bytes(self._pending), bytearray()
        try:
            self._writer.write(data)
        except BaseException as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.error is not None:
            raise self.error
        if self._pending:
            self._push()


def _failure(exc: BaseException, source: _Source, sink: _Sink, what: str) -> BaseException:
    """The exception to raise for a failed rage call: ours first (they say what happened), then rage's, in one line."""
    for ours in (source.error, sink.error):
        if ours is not None:
            return ours
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if what == "decrypt":
        if message == "No matching keys found":
            return AgeError("no identity in the age identity file matches this backup's recipients; use the secret key of a recipient it was encrypted to")
        if isinstance(exc, OSError) or message == "decryption error":
            return AgeError("age payload failed authentication: the file is damaged or truncated")
        return AgeError(f"cannot decrypt: the file is damaged, truncated or not an age file ({message})")
    return AgeError(f"age encryption failed ({message})")


def _is_rage_error(exc: BaseException) -> bool:
    # rage panics surface as pyo3's PanicException, a BaseException; treat them as errors, not crashes
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def encrypt(reader: Readable, writer: Writable, recipients: Sequence[str]) -> None:
    """Encrypt everything `reader` gives to `recipients`, into `writer`, in bounded memory."""
    keys = [parse_recipient(text) for text in recipients]
    sink = _Sink(writer)
    source = _Source(reader, check_header=False)
    try:
        pyrage.encrypt_io(cast(io.BufferedIOBase, source), cast(io.BufferedIOBase, sink), keys)
    except BaseException as exc:
        if not _is_rage_error(exc) and source.error is None and sink.error is None:
            raise
        raise _failure(exc, source, sink, "encrypt") from None
    sink.close()


def decrypt(reader: Readable, writer: Writable, identities: Identities) -> None:
    """Decrypt the age file `reader` gives into `writer`, in bounded memory. Only authenticated plaintext
    reaches `writer`; a damaged, truncated or foreign file raises AgeError (perhaps after some of it)."""
    sink = _Sink(writer)
    source = _Source(reader, check_header=True)
    try:
        pyrage.decrypt_io(cast(io.BufferedIOBase, source), cast(io.BufferedIOBase, sink), identities)
    except BaseException as exc:
        if not _is_rage_error(exc) and source.error is None and sink.error is None:
            raise
        try:
            sink.close()  # authenticated plaintext that rage had buffered
        except BaseException:
            pass
        raise _failure(exc, source, sink, "decrypt") from None
    sink.close()
