"""The remote's configuration: every bad key reported at once, one line each, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.storage.remote import KEYS, RemoteConfig, parse_remote


def problems(values: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_remote(values)
    return caught.value.problems


def test_no_remote_url_means_no_remote() -> None:
    assert parse_remote({}) is None
    assert parse_remote({"BACKUP_REMOTE_URL": "  "}) is None


def test_an_s3_remote_is_parsed_with_all_its_settings(tmp_path: Path) -> None:
    key, secret = tmp_path / "k", tmp_path / "s"
    key.write_text("AKIA\n")
    secret.write_text("s3cr3t\n")
    remote = parse_remote({"BACKUP_REMOTE_URL": "s3://my-bucket/prod/db1/", "BACKUP_REMOTE_ENDPOINT": "https://s3.example.com/",
                           "BACKUP_REMOTE_REGION": "eu-central-1", "BACKUP_REMOTE_RETENTION_DAYS": "90", "BACKUP_REMOTE_SSE": "aws:KMS",
                           "BACKUP_REMOTE_KMS_KEY_ID": "arn:aws:kms:eu-central-1:1:key/abc", "BACKUP_REMOTE_STORAGE_CLASS": "standard_ia",
                           "BACKUP_REMOTE_ACCESS_KEY_ID_FILE": str(key), "BACKUP_REMOTE_SECRET_ACCESS_KEY_FILE": str(secret)})
    assert remote == RemoteConfig(url="s3://my-bucket/prod/db1", endpoint="https://s3.example.com", region="eu-central-1", retention_days=90,
                                  sse="aws:kms", kms_key_id="arn:aws:kms:eu-central-1:1:key/abc", storage_class="STANDARD_IA",
                                  access_key_id_file=key, secret_access_key_file=secret)
    assert (remote.scheme, remote.bucket, remote.prefix) == ("s3", "my-bucket", "prod/db1")
    assert "s3cr3t" not in repr(remote.masked()) and "AKIA" not in repr(remote.masked())


def test_gcs_and_azure_urls_are_accepted() -> None:
    assert parse_remote({"BACKUP_REMOTE_URL": "gs://bucket"}) == RemoteConfig(url="gs://bucket")
    remote = parse_remote({"BACKUP_REMOTE_URL": "azure://container/x"})
    assert remote is not None and (remote.scheme, remote.bucket, remote.prefix) == ("az", "container", "x")


def test_every_bad_key_is_reported_at_once_one_line_each() -> None:
    found = problems({"BACKUP_REMOTE_URL": "ftp://bucket/x", "BACKUP_REMOTE_ENDPOINT": "s3.example.com", "BACKUP_REMOTE_REGION": "EU West",
                      "BACKUP_REMOTE_RETENTION_DAYS": "-1", "BACKUP_REMOTE_SSE": "rot13", "BACKUP_REMOTE_STORAGE_CLASS": "a b",
                      "BACKUP_REMOTE_ALLOW_HTTP": "maybe", "BACKUP_REMOTE_ACCESS_KEY_ID_FILE": "/nonexistent/key"})
    assert [p.split("=")[0] for p in found] == ["BACKUP_REMOTE_URL", "BACKUP_REMOTE_ENDPOINT", "BACKUP_REMOTE_REGION", "BACKUP_REMOTE_RETENTION_DAYS",
                                               "BACKUP_REMOTE_SSE", "BACKUP_REMOTE_STORAGE_CLASS", "BACKUP_REMOTE_ALLOW_HTTP",
                                               "BACKUP_REMOTE_ACCESS_KEY_ID_FILE"]
    assert all("\n" not in p for p in found)
    assert "must be s3://bucket/prefix" in found[0] and "accepted values: AES256, aws:kms" in found[4]


@pytest.mark.parametrize(("values", "message"), [
    ({"BACKUP_REMOTE_URL": "s3://AKIA:secret@bucket/x"}, "must not hold credentials"),
    ({"BACKUP_REMOTE_URL": "s3:///x"}, "names no valid bucket"),
    ({"BACKUP_REMOTE_URL": "s3://bucket/../x"}, "'..'"),
    ({"BACKUP_REMOTE_URL": "s3://bucket", "BACKUP_REMOTE_KMS_KEY_ID": "k"}, "BACKUP_REMOTE_KMS_KEY_ID needs BACKUP_REMOTE_SSE=aws:kms"),
    ({"BACKUP_REMOTE_URL": "s3://bucket", "BACKUP_REMOTE_ENDPOINT": "http://127.0.0.1:8333"}, "plain http; use https, or set BACKUP_REMOTE_ALLOW_HTTP=true"),
    ({"BACKUP_REMOTE_URL": "gs://bucket", "BACKUP_REMOTE_ENDPOINT": "https://x"}, "BACKUP_REMOTE_ENDPOINT applies to s3:// only"),
    ({"BACKUP_REMOTE_REGION": "us-east-1"}, "BACKUP_REMOTE_REGION is set but BACKUP_REMOTE_URL is not"),
])
def test_a_bad_combination_is_named(values: dict[str, str], message: str) -> None:
    assert any(message in p for p in problems(values)), problems(values)


def test_a_secret_in_a_bad_url_is_not_echoed() -> None:
    [problem] = problems({"BACKUP_REMOTE_URL": "s3://AKIA:supersecret@bucket/x"})
    assert "must not hold credentials" in problem
    # the value is shown (as config.py does) for every key but the URL's password: never repeat a secret
    assert "supersecret" not in problem


def test_the_keys_fold_into_the_main_configuration() -> None:
    assert all(key.startswith("remote.") and variable.startswith("BACKUP_REMOTE_") for key, (variable, _parser) in KEYS.items())
    assert {key.split(".", 1)[1] for key in KEYS} == set(RemoteConfig.__dataclass_fields__)
