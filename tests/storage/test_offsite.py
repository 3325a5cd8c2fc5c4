"""The off-site copy in the product, against a real S3 server (SeaweedFS) and real PostgreSQL: the remote settings in
validate-config, every backup copied once committed, a store down during the copy, copy pending, list and verify --remote."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from tests.conftest import cli
from tests.storage.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer, free_ports


def offline_env(**extra: str) -> dict[str, str]:
    """An environment for commands that do not touch PostgreSQL (validate-config)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG", "AWS_"))}
    return {**clean, "DATABASE_URL": "postgresql://u@h/db", **extra}


def error_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and SECRET_KEY not in stderr, stderr
    return lines


# --- validate-config checks that the remote can be used ------------------------------------------

def test_validate_config_accepts_a_usable_remote_and_prints_it_without_secrets(seaweed: SeaweedServer) -> None:
    env = offline_env(**seaweed.environment("p-" + uuid.uuid4().hex[:8]))
    assert cli(env, "validate-config").stdout.strip() == "configuration is valid"
    printed = cli(env, "validate-config", "--print").stdout
    shown = json.loads(printed)
    assert shown["remote.url"].startswith("s3://backups/p-") and shown["remote.endpoint"] == seaweed.endpoint
    assert SECRET_KEY not in printed and ACCESS_KEY not in printed


def test_validate_config_names_a_missing_bucket_in_one_line_and_exits_2(seaweed: SeaweedServer) -> None:
    env = offline_env(**seaweed.environment(bucket="no-such-bucket"))
    result = cli(env, "validate-config", check=False)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("config error:") and "bucket 'no-such-bucket' does not exist" in line


def test_validate_config_names_wrong_credentials_in_one_line_and_exits_2(seaweed: SeaweedServer) -> None:
    env = offline_env(**{**seaweed.environment(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    result = cli(env, "validate-config", check=False)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "rejected the credentials" in line and "not-the-secret" not in line


def test_validate_config_names_an_unreachable_endpoint_in_one_line_and_exits_2(seaweed: SeaweedServer) -> None:
    [port] = free_ports(1)  # nothing listens there
    env = offline_env(**{**seaweed.environment(), "BACKUP_REMOTE_ENDPOINT": f"http://127.0.0.1:{port}"})
    result = cli(env, "validate-config", check=False)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "cannot reach the endpoint" in line


def test_validate_config_names_a_bad_remote_url_in_one_line_and_exits_2(tmp_path: Path) -> None:
    result = cli(offline_env(BACKUP_REMOTE_URL="s3://Bad_Bucket!/x"), "validate-config", check=False)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("config error: BACKUP_REMOTE_URL=") and "bucket" in line
