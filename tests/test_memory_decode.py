"""Memory stays flat whatever the compression ratio: a backup of a table that compresses over 1000:1
backs up, verifies, restores and drills in a process whose peak RSS stays under 100 MB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import age
from sidecar.embedded import Cluster

ROWS = 1_000_000
WIDTH = 160  # identical rows: a ~160 MB dump that zstd and gzip squeeze over 1000:1
LIMIT_MIB = 100

# the CLI in this process, then its own peak RSS (the sidecar, not pg_restore or psql) on the last stderr
# line: VmHWM of this process image, not ru_maxrss, which Linux carries over from the forking pytest
_MEASURED = (
    "import sys\n"
    "from sidecar.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
    "print(f'peak_rss_kib {hwm}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def measured(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI as a child; returns its result and its peak RSS in MiB."""
    result = subprocess.run([sys.executable, "-c", _MEASURED, *args], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"pg-backup-sidecar {' '.join(args)} exited {result.returncode}: {result.stderr}"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("peak_rss_kib "), result.stderr
    return result, int(last.split()[1]) // 1024


# deflate cannot reach 1000:1 on these rows (its matches stop at 258 bytes): gzip -9 gets about 250:1,
# so its whole file is still one 1 MiB read that expanded to the full 160 MB dump in one call before
@pytest.mark.parametrize(("compression", "level", "encrypted", "ratio"), [("zstd", 1, True, 1000), ("zstd", 1, False, 1000), ("gzip", 9, False, 200)])
def test_a_backup_that_compresses_over_1000_to_1_verifies_restores_and_drills_in_under_100_mb(
        cluster: Cluster, db: str, env: dict[str, str], tmp_path: Path, compression: str, level: int, encrypted: bool, ratio: int) -> None:
    cluster.psql(f"CREATE TABLE same AS SELECT repeat('x', {WIDTH}) AS filler FROM generate_series(1, {ROWS})", db)
    env = {**env, "BACKUP_COMPRESSION": compression, "BACKUP_COMPRESSION_LEVEL": str(level), "VALIDATION_ENABLED": "false"}
    if encrypted:
        secret, public = age.generate_identity()
        key = tmp_path / "key.txt"
        key.write_text(secret + "\n")
        env.update(BACKUP_ENCRYPTION="true", BACKUP_ENCRYPTION_RECIPIENTS=public, BACKUP_ENCRYPTION_IDENTITY_FILE=str(key))

    backed_up, backup_mib = measured(env, "backup")
    bid = backed_up.stdout.strip().splitlines()[-1]
    metadata = json.loads((Path(env["BACKUP_DIR"]) / f"{bid}.metadata.json").read_text())
    assert metadata["size"] * ratio < ROWS * WIDTH, f"the dump file is {metadata['size']} bytes: not over {ratio}:1"

    verified, verify_mib = measured(env, "verify", bid, "--json")
    assert json.loads(verified.stdout)["ok"] is True
    _, restore_mib = measured(env, "restore", bid, "--target-db", f"{db}_restored")
    assert cluster.psql("SELECT count(*), min(length(filler)) FROM same", f"{db}_restored") == f"{ROWS}|{WIDTH}"
    _, drill_mib = measured(env, "drill", bid)

    peaks = {"backup": backup_mib, "verify": verify_mib, "restore": restore_mib, "drill": drill_mib}
    print(f"{compression} -{level} encrypted={encrypted}: {ROWS * WIDTH // metadata['size']}:1, peak RSS MiB {peaks}")
    assert max(peaks.values()) < LIMIT_MIB, f"peak RSS in MiB: {peaks}"
