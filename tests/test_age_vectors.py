"""Every age test vector of C2SP CCTV (tests/data/cctv-age, see its LICENSE) through our decrypt path:
an expected success gives exactly the payload; every expected failure is a clean AgeError (one line,
no traceback) and never releases plaintext other than the authenticated prefix the vector names.

We support X25519 identities and binary files only: the passphrase (scrypt), post-quantum (hybrid)
and armored vectors are decrypted with an unrelated X25519 key and must fail cleanly, whatever they
expect, releasing nothing."""

from __future__ import annotations

import hashlib
import io
import zlib
from pathlib import Path

import pytest

from sidecar import age
from sidecar.streams import decode

VECTORS = Path(__file__).parent / "data" / "cctv-age"
NAMES = sorted(p.name for p in VECTORS.iterdir() if p.name not in ("LICENSE", ".gitattributes"))


def read_vector(name: str) -> tuple[dict[str, list[str]], bytes]:
    data = (VECTORS / name).read_bytes()
    head, body = data.split(b"\n\n", 1)
    fields: dict[str, list[str]] = {}
    for line in head.decode().splitlines():
        key, value = line.split(": ", 1)
        fields.setdefault(key, []).append(value)
    if fields.get("compressed") == ["zlib"]:
        body = zlib.decompress(body)
    return fields, body


def supported(fields: dict[str, list[str]]) -> bool:
    """X25519 identities, binary files: what a backup uses."""
    identities = fields.get("identity", [])
    return "passphrase" not in fields and fields.get("armored") != ["yes"] and all(i.startswith("AGE-SECRET-KEY-1") for i in identities)


def test_the_vectors_are_all_there() -> None:
    assert len(NAMES) == 143
    assert sum(supported(read_vector(n)[0]) for n in NAMES) == 67


@pytest.mark.parametrize("name", NAMES)
def test_a_cctv_age_vector_decrypts_to_its_payload_or_fails_cleanly(name: str, tmp_path: Path) -> None:
    fields, body = read_vector(name)
    key = tmp_path / "key.txt"
    if supported(fields) and "identity" in fields:
        key.write_text("# the vector's identities\n\n" + "\n".join(fields["identity"]) + "\n")
    else:  # scrypt, post-quantum or armored: not ours to open (or no identity given)
        key.write_text(age.generate_identity()[0] + "\n")
    released = io.BytesIO()
    expect = fields["expect"][0]
    if expect == "success" and supported(fields):
        decode(io.BytesIO(body), released, "none", age.parse_identities(key))
    else:
        with pytest.raises(age.AgeError) as caught:
            decode(io.BytesIO(body), released, "none", age.parse_identities(key))
        assert "\n" not in str(caught.value)
    if not supported(fields):
        assert released.getvalue() == b""
    elif "payload" in fields:  # on a payload failure, what was released before it must be the right prefix
        assert hashlib.sha256(released.getvalue()).hexdigest() == fields["payload"][0]
