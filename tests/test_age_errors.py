"""age: bad keys are configuration errors, damaged files are one-line errors, nothing buffers without bound."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from sidecar import age
from sidecar.embedded import Cluster
from tests.conftest import backup_id, cli


def _bech32(hrp: str, payload: bytes) -> str:
    charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"

    def polymod(values: list[int]) -> int:
        chk = 1
        for value in values:
            top = chk >> 25
            chk = (chk & 0x1FFFFFF) << 5 ^ value
            for i, g in enumerate((0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)):
                chk ^= g if (top >> i) & 1 else 0
        return chk

    bits = "".join(f"{b:08b}" for b in payload)
    data = [int(bits[i:i + 5].ljust(5, "0"), 2) for i in range(0, len(bits), 5)]
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    check = polymod(expanded + data + [0] * 6) ^ 1
    return hrp + "1" + "".join(charset[d] for d in data + [(check >> 5 * (5 - i)) & 31 for i in range(6)])


def low_order_points() -> list[str]:
    """The X25519 points of order 1, 2, 4 and 8, canonical and not: every shared secret with them is zero."""
    points = ["00" * 32, "01" + "00" * 31, "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
              "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157", "ec" + "ff" * 30 + "7f",
              "ed" + "ff" * 30 + "7f", "ee" + "ff" * 30 + "7f",
              # the top bit is ignored (RFC 7748), so these are the same points
              "00" * 31 + "80", "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880"]
    return [_bech32("age", bytes.fromhex(p)) for p in points]


@pytest.mark.parametrize("recipient", low_order_points())
def test_a_low_order_recipient_key_is_a_config_error_naming_the_variable(recipient: str) -> None:
    _, good = age.generate_identity()
    env = {"DATABASE_URL": "postgresql://a@h/x", "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": f"{good},{recipient}",
           "PATH": "/usr/bin:/bin"}
    for command in ("validate-config", "backup") if recipient == low_order_points()[0] else ("validate-config",):
        result = cli(env, command, check=False)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr
        assert "BACKUP_ENCRYPTION_RECIPIENTS" in lines[0] and "low-order" in lines[0]


def test_a_mistyped_recipient_key_is_a_config_error() -> None:
    _, public = age.generate_identity()
    age.parse_recipient(public)
    with pytest.raises(ValueError, match="not a valid age public key"):
        age.parse_recipient(public[:-1] + ("q" if public[-1] != "q" else "p"))


class Counting:
    def __init__(self, data: bytes) -> None:
        self.data, self.consumed = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        size = len(self.data) if size < 0 else size
        piece, self.data = bytes(self.data[:size]), self.data[size:]
        self.consumed += len(piece)
        return piece


@pytest.mark.parametrize("start", [
    b"age-encryption.org/v1\n-> X25519 " + b"A" * (64 << 20),  # a stanza line that never ends
    b"age-encryption.org/v1\n-> X25519 AAAA\nAAAA\n--- " + b"A" * (64 << 20),  # a MAC line without its newline
])
def test_an_age_header_that_never_ends_is_refused_after_reading_at_most_2_mib(start: bytes) -> None:
    secret, _ = age.generate_identity()
    source = Counting(start)
    with pytest.raises(age.AgeError, match="no end of the age header"):
        age.decrypt(source, io.BytesIO(), _identity(secret))
    assert source.consumed <= 2 << 20


def _identity(secret: str) -> age.Identities:
    from pyrage import x25519

    return [x25519.Identity.from_str(secret)]


def test_an_identity_file_in_age_format_with_comments_blank_lines_and_several_keys_works(tmp_path: Path) -> None:
    first, _ = age.generate_identity()
    second, public = age.generate_identity()
    key = tmp_path / "keys.txt"
    key.write_text(f"# created: 2024-01-01T00:00:00Z\n# public key: {public}\n\n{first}\r\n\n# the second one\n  {second}  \n")
    data = os.urandom(100_000)
    stored = io.BytesIO()
    age.encrypt(io.BytesIO(data), stored, [public])
    out = io.BytesIO()
    age.decrypt(io.BytesIO(stored.getvalue()), out, age.parse_identities(key))
    assert out.getvalue() == data


def test_a_bad_identity_file_names_the_line_and_never_shows_a_key(tmp_path: Path) -> None:
    secret, _ = age.generate_identity()
    key = tmp_path / "keys.txt"
    key.write_text(f"# mine\n{secret}\n{secret[:-3]}xyz\n")
    with pytest.raises(age.AgeError) as caught:
        age.parse_identities(key)
    assert "line 3" in str(caught.value) and secret[15:30] not in str(caught.value)
    key.write_text("# nothing here\n\n")
    with pytest.raises(age.AgeError, match="holds no AGE-SECRET-KEY"):
        age.parse_identities(key)


class FailsAtTheEnd:
    """A file that fills up just before the last bytes (ENOSPC on the final write)."""

    def __init__(self, room: int) -> None:
        self.room, self.written = room, 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.written += len(data)
        return len(data)


@pytest.mark.parametrize("size", [0, 1000, 3 << 20])
def test_a_write_error_on_the_last_bytes_of_an_encryption_is_raised_not_lost(size: int) -> None:
    # rage writes its last buffered bytes while it cleans up and ignores errors there; the file would
    # look complete. (The header's length varies: rage adds random "grease" stanzas.)
    _, public = age.generate_identity()
    with pytest.raises(OSError, match="No space left"):
        age.encrypt(io.BytesIO(b"x" * size), FailsAtTheEnd(size + 10), [public])


def _damage(kind: str, data: bytes) -> bytes:
    header_end = data.index(b"\n---") + 1
    if kind == "header":  # a stanza's share with a character base64 does not have
        return data.replace(b"-> X25519 ", b"-> X25519 !", 1)
    if kind == "mac":
        return data[:header_end + 5] + bytes([data[header_end + 5] ^ 1]) + data[header_end + 6:]
    if kind == "payload":
        middle = (header_end + len(data)) // 2
        return data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:]
    if kind == "truncated":
        return data[:-10]
    if kind == "trailing":
        return data + b"\x00" * 20
    assert kind == "not age"
    return b"(\xb5/\xfd" + data[4:]


@pytest.fixture
def encrypted_backup(cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], str]:
    cluster.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g", db)
    secret, public = age.generate_identity()
    key = tmp_path / "key.txt"
    key.write_text(secret + "\n")
    encrypted = {**env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": public, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(key)}
    return encrypted, backup_id(encrypted)


@pytest.mark.parametrize("kind", ["header", "mac", "payload", "truncated", "trailing", "not age"])
def test_a_damaged_encrypted_backup_is_a_one_line_error_and_changes_nothing(
        cluster: Cluster, db: str, encrypted_backup: tuple[dict[str, str], str], kind: str) -> None:
    env, bid = encrypted_backup
    directory = Path(env["BACKUP_DIR"])
    meta = json.loads((directory / f"{bid}.metadata.json").read_text())
    path = directory / meta["files"]["dump"]["name"]
    data = _damage(kind, path.read_bytes())
    path.write_bytes(data)
    # re-recorded as if it had been written so: the checksum passes and decryption itself must catch it
    digest = hashlib.sha256(data).hexdigest()
    meta["files"]["dump"].update(size=len(data), checksum=digest)
    meta.update(size=len(data), checksum=digest)
    (directory / f"{bid}.metadata.json").write_text(json.dumps(meta))

    verified = cli(env, "verify", bid, "--json", check=False)
    assert verified.returncode == 1 and "Traceback" not in verified.stderr, verified.stderr
    problems = json.loads(verified.stdout)["problems"]
    assert len(problems) == 1 and "\n" not in problems[0]
    restored = cli(env, "restore", bid, check=False)
    assert restored.returncode == 3 and "Traceback" not in restored.stderr, restored.stderr
    assert len([line for line in restored.stderr.splitlines() if line.startswith("error:")]) == 1, restored.stderr
    assert cluster.psql("SELECT count(*) FROM t", db) == "50000"
    assert cluster.psql(f"SELECT count(*) FROM pg_database WHERE datname LIKE '{db}\\_\\_restore%'") == "0"
    stock = subprocess.run(["age", "-d", "-i", env["BACKUP_ENCRYPTION_IDENTITY_FILE"], str(path)], capture_output=True)
    assert stock.returncode != 0  # the stock age CLI refuses it too
