"""Build the real image and run it against a test PostgreSQL, as the non-root user, read-only root.

No Docker engine runs here; podman does (runc, cgroupfs, host network). Image registries are not
reachable, so the Debian base image is made locally with debootstrap and cached between runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

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


def apt_sources(etc: Path = Path("/etc/apt")) -> list[tuple[list[str], list[str]]]:
    """(types, URIs) of every enabled entry of apt's sources: the one-line format of sources.list and
    sources.list.d/*.list, and the deb822 format of sources.list.d/*.sources (other files apt ignores)."""
    entries: list[tuple[list[str], list[str]]] = []
    for path in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        for line in path.read_text().splitlines() if path.is_file() else []:
            words = line.split("#", 1)[0].split()
            if words and words[0] in ("deb", "deb-src"):
                rest = words[1:]
                if rest and rest[0].startswith("["):  # options: [arch=amd64 signed-by=...]
                    while rest and not rest[0].endswith("]"):
                        rest = rest[1:]
                    rest = rest[1:]
                entries.append(([words[0]], rest[:1]))
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            key = ""
            for line in stanza.splitlines():
                if line.startswith("#"):
                    continue
                if line[:1].isspace() and key:
                    fields[key] += " " + line.strip()
                elif ":" in line:
                    key, value = (part.strip() for part in line.split(":", 1))
                    fields[key.lower()] = value
                    key = key.lower()
            if fields.get("enabled", "yes").lower() != "no" and "uris" in fields:
                entries.append((fields.get("types", "").split(), fields["uris"].split()))
    return entries


def mirror(etc: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses here (debootstrap needs one; registries are not reachable)."""
    for types, uris in apt_sources(etc):
        for uri in uris:
            if "deb" in types and uri.startswith(("http://", "https://")) and uri.rstrip("/").endswith("/debian"):
                return uri
    raise AssertionError(f"no Debian mirror in apt's sources ({etc}/sources.list, {etc}/sources.list.d/*.list or *.sources): "
                         "add an http(s) URI ending in /debian, e.g. 'deb http://deb.debian.org/debian trixie main'")


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
        # the server binaries a point-in-time restore starts as its scratch instance: a server of the image's major
        # initialises, starts and answers as the non-root user on the read-only root (the tmpfs /tmp only)
        scratch = podman("exec", name, "sh", "-c", 'set -e; "$PG_BIN_DIR/postgres" --version; "$PG_BIN_DIR/initdb" -D /tmp/scratch -U x '
                         '--auth=trust -E UTF8 --locale=C.UTF-8 --no-sync >/dev/null; "$PG_BIN_DIR/pg_ctl" -D /tmp/scratch -l /tmp/scratch.log '
                         '-o "-c listen_addresses= -k /tmp" -w start >/dev/null; psql -h /tmp -U x -d postgres -Atc "SHOW server_version_num"; '
                         '"$PG_BIN_DIR/pg_ctl" -D /tmp/scratch -m fast -w stop >/dev/null', check=False)
        assert scratch.returncode == 0, scratch.stderr
        banner, number = scratch.stdout.strip().splitlines()  # "postgres (PostgreSQL) 17.x ...", "170012"
        assert f"(PostgreSQL) {int(number) // 10000}." in banner
        podman("stop", "-t", "30", name)
        assert podman("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        podman("rm", "-f", name, check=False)


def apt(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_mirror_comes_from_deb822_sources_skipping_comments_disabled_entries_and_other_archives(tmp_path: Path) -> None:
    etc = apt(tmp_path, {
        "sources.list.d/debian.sources": "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://mirror.example/debian-security\n"
                                         "Suites: trixie-security\n\nTypes: deb\nURIs: http://off.example/debian\nEnabled: no\n\n"
                                         "Types: deb deb-src\nURIs:\n http://mirror.example/debian/\nSuites: trixie\nComponents: main\n",
        "sources.list.d/old.list.disabled": "deb http://stale.example/debian trixie main\n",
    })
    assert mirror(etc) == "http://mirror.example/debian/"


def test_the_mirror_comes_from_a_one_line_sources_list_with_options(tmp_path: Path) -> None:
    etc = apt(tmp_path, {"sources.list": "# deb http://commented.example/debian trixie main\n"
                                         "deb [ arch=amd64 signed-by=/k.gpg ] https://mirror.example/debian trixie main\n"})
    assert mirror(etc) == "https://mirror.example/debian"


def test_no_mirror_in_apts_sources_is_a_clear_failure_not_a_guess(tmp_path: Path) -> None:
    etc = apt(tmp_path, {"sources.list.d/nodesource.sources": "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"})
    with pytest.raises(AssertionError, match="no Debian mirror in apt's sources"):
        mirror(etc)
