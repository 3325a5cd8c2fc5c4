"""Build the real image and run it against a test PostgreSQL, as the non-root user, read-only root.

No Docker engine runs here; podman does (runc, cgroupfs, host network). Image registries are not
reachable, so the Debian base image is made locally with debootstrap and cached between runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from sidecar.embedded import Cluster
from tests.test_daemon import free_port

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PGSC_IMAGE_CACHE", "/var/cache/pgsc-image"))
BASE = "docker.io/library/debian:trixie-slim"
TAG = "localhost/pg-backup-sidecar:test"


def podman(*args: str, check: bool = True, timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(CACHE / "containers.conf")}
    result = subprocess.run(["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs", *args], env=env, capture_output=True, text=True,
                            timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:2])} failed: {result.stderr[-3000:]}")
    return result  # type: ignore[no-any-return]


def mirror() -> str:
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        for line in path.read_text().splitlines() if path.is_file() else []:
            for word in line.replace("URIs:", " ").split():
                if word.startswith("http") and word.rstrip("/").endswith("/debian"):
                    return word
    return "http://deb.debian.org/debian"


def build_image() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "containers.conf").write_text("[containers]\ndefault_ulimits = []\n")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        rootfs = CACHE / "rootfs"
        if not (rootfs / "etc" / "debian_version").exists():
            shutil.rmtree(rootfs, ignore_errors=True)
            subprocess.run(["debootstrap", "--variant=minbase", "trixie", str(rootfs), mirror()], check=True, capture_output=True, timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        podman("import", "-", BASE, stdin=tar.stdout)
        tar.wait()
    podman("build", "--network=host", "-v", "/etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt",
           "-t", TAG, str(ROOT))


def test_the_image_backs_up_serves_metrics_and_stops_cleanly_as_non_root_with_a_read_only_root(cluster: Cluster, db: str, tmp_path: Path) -> None:
    build_image()
    cluster.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g", db)
    backups = tmp_path / "backups"
    backups.mkdir()
    os.chown(backups, 10001, 10001)
    port = free_port()
    name = f"pgsc-test-{port}"
    podman("run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "--network=host",
           "-v", f"{cluster.socket_dir}:{cluster.socket_dir}", "-v", f"{backups}:/backups",
           "-e", f"DATABASE_URL={cluster.url(db)}", "-e", "BACKUP_ON_START=true", "-e", f"SIDECAR_LISTEN=127.0.0.1:{port}", TAG)
    try:
        metrics = ""
        for _ in range(120):
            try:
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                if 'pg_backup_runs_total{result="success"} 1.0' in metrics:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert 'pg_backup_runs_total{result="success"} 1.0' in metrics, podman("logs", name, check=False).stderr[-3000:]
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert podman("exec", name, "touch", "/etc/x", check=False).returncode != 0
        assert len(list(backups.glob("*.metadata.json"))) == 1
        podman("stop", "-t", "30", name)
        assert podman("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        podman("rm", "-f", name, check=False)
