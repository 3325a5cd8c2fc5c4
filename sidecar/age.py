"""The age file format (age-encryption.org/v1), X25519 recipients, streaming.

Files written here open with the stock `age -d -i key.txt`, and files from `age -r age1...` open here.
Only what a backup tool needs: X25519 recipients and identities, no passphrases, no armor.
"""

from __future__ import annotations

import base64
import hmac
import os
from hashlib import sha256
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidecar.errors import SidecarError

MAGIC = b"age-encryption.org/v1"
CHUNK = 64 * 1024
TAG = 16
Identities = list[X25519PrivateKey]
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


class AgeError(SidecarError):
    pass


# --- bech32 (BIP 173), just enough for age keys -------------------------------------------------

def _polymod(values: list[int]) -> int:
    generator = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i in range(5):
            chk ^= generator[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convertbits(data: list[int] | bytes, frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (tobits - bits)) & maxv)
    elif not pad and (bits >= frombits or (acc << (tobits - bits)) & maxv):
        raise ValueError("invalid padding")
    return out


def bech32_decode(text: str) -> tuple[str, bytes]:
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text):
        raise ValueError("no separator")
    hrp, data = text[:pos], text[pos + 1 :]
    if any(c not in _CHARSET for c in data):
        raise ValueError("invalid character")
    values = [_CHARSET.index(c) for c in data]
    if _polymod(_hrp_expand(hrp) + values) != 1:
        raise ValueError("bad checksum")
    return hrp, bytes(_convertbits(values[:-6], 5, 8, False))


def bech32_encode(hrp: str, payload: bytes) -> str:
    data = _convertbits(payload, 8, 5, True)
    polymod = _polymod(_hrp_expand(hrp) + data + [0] * 6) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[d] for d in data + checksum)


# --- keys -----------------------------------------------------------------------------------------

def parse_recipient(text: str) -> X25519PublicKey:
    try:
        hrp, key = bech32_decode(text.strip())
    except ValueError:
        hrp, key = "", b""
    if hrp != "age" or len(key) != 32:
        raise ValueError(f"{text[:12]}... is not an age X25519 public key (age1...)")
    return X25519PublicKey.from_public_bytes(key)


def parse_identities(path: Path) -> list[X25519PrivateKey]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AgeError(
            f"age identity file {path}: cannot read it ({exc.strerror}); set BACKUP_ENCRYPTION_IDENTITY_FILE to the age secret key file"
        ) from None
    keys = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            hrp, secret = bech32_decode(line)
        except ValueError:
            hrp, secret = "", b""
        if hrp != "age-secret-key-" or len(secret) != 32:
            raise AgeError(f"age identity file {path}: a line is not an AGE-SECRET-KEY-1... key; generate one with age-keygen")
        keys.append(X25519PrivateKey.from_private_bytes(secret))
    if not keys:
        raise AgeError(f"age identity file {path}: holds no AGE-SECRET-KEY-1... key")
    return keys


def generate_identity() -> tuple[str, str]:
    """A new (secret key, public key) pair in age's text form."""
    key = X25519PrivateKey.generate()
    return (
        bech32_encode("age-secret-key-", key.private_bytes_raw()).upper(),
        bech32_encode("age", key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)),
    )


# --- format ---------------------------------------------------------------------------------------

def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    if data.endswith(b"=") or b"\n" in data:
        raise AgeError("age header: malformed base64")
    return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _x25519_info() -> bytes:
    return b"age-encryption.org/v1/X25519"


class Encryptor:
    """Push plaintext in, take ciphertext out; `finish()` seals the last chunk."""

    def __init__(self, recipients: list[str] | tuple[str, ...]) -> None:
        file_key = os.urandom(16)
        header = MAGIC + b"\n"
        for text in recipients:
            public = parse_recipient(text)
            public_raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
            ephemeral = X25519PrivateKey.generate()
            share = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            wrap_key = _hkdf(ephemeral.exchange(public), share + public_raw, _x25519_info())
            body = ChaCha20Poly1305(wrap_key).encrypt(b"\x00" * 12, file_key, None)
            header += b"-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n"
        header += b"---"
        mac = hmac.new(_hkdf(file_key, b"", b"header"), header, sha256).digest()
        nonce = os.urandom(16)
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._pending = bytearray(header + b" " + _b64(mac) + b"\n" + nonce)
        self._plain = bytearray()
        self._counter = 0

    def update(self, data: bytes) -> bytes:
        self._plain += data
        out = self._pending
        self._pending = bytearray()
        # keep at least one byte back: the last chunk must carry the "last" flag
        while len(self._plain) > CHUNK:
            out += self._aead.encrypt(_nonce(self._counter, False), bytes(self._plain[:CHUNK]), None)
            del self._plain[:CHUNK]
            self._counter += 1
        return bytes(out)

    def finish(self) -> bytes:
        out = self._pending + self._aead.encrypt(_nonce(self._counter, True), bytes(self._plain), None)
        self._plain = bytearray()
        return bytes(out)


class Decryptor:
    """Push ciphertext in, take plaintext out; `finish()` fails if the stream ended early."""

    def __init__(self, identities: list[X25519PrivateKey]) -> None:
        self._identities = identities
        self._buffer = bytearray()
        self._aead: ChaCha20Poly1305 | None = None
        self._counter = 0
        self._done = False

    def _parse_header(self) -> bool:
        end = self._buffer.find(b"\n---")
        if end < 0:
            if len(self._buffer) > 1 << 20 or (self._buffer and not MAGIC.startswith(bytes(self._buffer[: len(MAGIC)]))):
                raise AgeError("not an age file (no age-encryption.org/v1 header)")
            return False
        line_end = self._buffer.find(b"\n", end + 1)
        if line_end < 0 or len(self._buffer) < line_end + 1 + 16:
            return False
        header = bytes(self._buffer[: end + 4])
        lines = header.split(b"\n")
        if lines[0] != MAGIC:
            raise AgeError("not an age file (no age-encryption.org/v1 header)")
        mac = _unb64(bytes(self._buffer[end + 5 : line_end]))
        nonce = bytes(self._buffer[line_end + 1 : line_end + 17])
        del self._buffer[: line_end + 17]
        file_key = self._unwrap(lines[1:-1])
        if not hmac.compare_digest(hmac.new(_hkdf(file_key, b"", b"header"), header, sha256).digest(), mac):
            raise AgeError("age header MAC mismatch: the file is damaged")
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        return True

    def _unwrap(self, lines: list[bytes]) -> bytes:
        i = 0
        while i < len(lines):
            args = lines[i].split(b" ")
            if args[0] != b"->":
                raise AgeError("age header: malformed recipient stanza")
            body = b""
            i += 1
            while i < len(lines):
                body += lines[i]
                i += 1
                if len(lines[i - 1]) < 64:
                    break
            if args[1:2] == [b"X25519"] and len(args) == 3:
                share = _unb64(args[2])
                for identity in self._identities:
                    public = identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                    wrap_key = _hkdf(identity.exchange(X25519PublicKey.from_public_bytes(share)), share + public, _x25519_info())
                    try:
                        return ChaCha20Poly1305(wrap_key).decrypt(b"\x00" * 12, _unb64(body), None)
                    except InvalidTag:
                        continue
        raise AgeError("no identity in the age identity file matches this backup's recipients; use the secret key of a recipient it was encrypted to")

    def update(self, data: bytes) -> bytes:
        self._buffer += data
        if self._aead is None and not self._parse_header():
            return b""
        assert self._aead is not None
        out = bytearray()
        # a full chunk is only decryptable as "not last" once more bytes follow it
        while len(self._buffer) > CHUNK + TAG:
            out += self._open(bytes(self._buffer[: CHUNK + TAG]), last=False)
            del self._buffer[: CHUNK + TAG]
        return bytes(out)

    def _open(self, chunk: bytes, last: bool) -> bytes:
        assert self._aead is not None
        if self._done:
            raise AgeError("age payload: data after the final chunk")
        try:
            plain = self._aead.decrypt(_nonce(self._counter, last), chunk, None)
        except InvalidTag:
            raise AgeError("age payload failed authentication: the file is damaged or truncated") from None
        self._counter += 1
        self._done = last
        return plain

    def finish(self) -> bytes:
        if self._aead is None:
            raise AgeError("age file ends inside its header: the file is truncated")
        return self._open(bytes(self._buffer), last=True)
