"""A backup with its off-site copy vs the same backup without, upload throughput of the finished dump through our
copy path vs plain obstore.put vs `aws s3 cp`, and peak RSS: side by side in one run, against a local SeaweedFS.

    python bench/bench_offsite.py --size-mb 1000 --rounds 3          (about 1 GB of tests/data/realistic.sql)
    python bench/bench_offsite.py --size-mb 100 --rounds 3 --explain (and where the time goes: part size,
                                                                       concurrency, copying while the dump is written)

Starts a throwaway PostgreSQL (sidecar.embedded.Cluster) and SeaweedFS (tests/storage/seaweed.py, as the tests do).
Every case runs once per round, interleaved; medians of the rounds are printed with the load average read before
and after each measure and the CPU seconds used meanwhile by the client, PostgreSQL, SeaweedFS and everything else on
the machine (it may be shared: then SeaweedFS and the other jobs take CPU from the backup, see bench/RESULTS.md). Results are recorded by hand in bench/RESULTS.md."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import obstore  # noqa: E402
from obstore.store import S3Store  # noqa: E402

from sidecar.embedded import Cluster  # noqa: E402
from sidecar.postgres import find_tool  # noqa: E402
from sidecar.repository import PARTIAL_SUFFIX  # noqa: E402
from sidecar.storage.copy import copy_backup  # noqa: E402
from sidecar.storage.objectstore import CONCURRENCY, PART_SIZE, ObjectStore  # noqa: E402
from tests.storage.seaweed import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedServer, free_ports  # noqa: E402

DATASET = ROOT / "tests" / "data" / "realistic.sql"
ROWS_PER_MB = 3673  # realistic.sql: 4,000,000 rows make a 1089 MB database

# the CLI in this process, then its own peak RSS (VmHWM of this process image: ru_maxrss would carry over the
# forking parent's peak) on the last stderr line, as tests/test_memory_decode.py does
MEASURED = (
    "import sys\n"
    "from sidecar.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
    "print(f'peak_rss_kib {hwm}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


TICK = os.sysconf("SC_CLK_TCK")
WHO = ("client", "postgres", "seaweedfs", "others")


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def process_cpu(pid: int, reaped: bool = True) -> float:
    """CPU seconds (user + system) of a process, with those of its children it has waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15 if reaped else 13]) / TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of a process, of its children reaped, and of its children alive (a server's workers)."""
    total = process_cpu(root)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == root:
                total += process_cpu(int(entry.name))
    return total


def machine_cpu() -> float:
    """CPU seconds every process of the machine has used (user, nice, system, irq, softirq, steal)."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(jiffies[:3]) + sum(jiffies[5:8])) / TICK


def own_cpu() -> float:
    """This process and the children it has waited for (the CLI and its pg_dump, aws)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


class Figures:
    """Seconds (and other values) per case over the rounds, with the 1-minute load average around each measure and
    the CPU seconds used meanwhile by the client (this bench and the processes it ran), PostgreSQL, SeaweedFS and
    everything else on the machine (the other jobs sharing it)."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.loads: dict[str, list[tuple[float, float]]] = {}
        self.cpu: dict[str, list[dict[str, float]]] = {}
        self.postgres_pid = 0
        self.seaweed_pid = 0

    def cpu_now(self) -> dict[str, float]:
        return {"client": own_cpu(), "postgres": tree_cpu(self.postgres_pid) if self.postgres_pid else 0.0,
                "seaweedfs": tree_cpu(self.seaweed_pid) if self.seaweed_pid else 0.0, "machine": machine_cpu()}

    def measure(self, case: str, action: Callable[[], Any]) -> Any:
        before, cpu, began = load(), self.cpu_now(), time.monotonic()
        result = action()
        seconds = time.monotonic() - began
        used = {k: v - cpu[k] for k, v in self.cpu_now().items()}
        used["others"] = max(0.0, used.pop("machine") - used["client"] - used["postgres"] - used["seaweedfs"])
        self.cpu.setdefault(case, []).append(used)
        self.add(case, seconds, (before, load()))
        print(f"#   {case}: {seconds:.2f} s (load {before:.2f} -> {load():.2f}; CPU s: "
              + ", ".join(f"{k} {used[k]:.1f}" for k in WHO) + ")", flush=True)
        return result

    def cpu_median(self, case: str) -> str:
        return " / ".join(f"{statistics.median(r[k] for r in self.cpu[case]):.1f}" for k in WHO) if case in self.cpu else "-"

    def add(self, case: str, value: float, loads: tuple[float, float] | None = None) -> None:
        self.values.setdefault(case, []).append(value)
        if loads:
            self.loads.setdefault(case, []).append(loads)

    def median(self, case: str) -> float:
        return statistics.median(self.values[case])

    def spread(self, case: str, digits: int = 2) -> str:
        return "/".join(f"{v:.{digits}f}" for v in self.values[case])

    def load_range(self, case: str) -> str:
        seen = [x for pair in self.loads.get(case, []) for x in pair]
        return f"{min(seen):.2f}-{max(seen):.2f}" if seen else "-"


def run_cli(env: dict[str, str], *args: str) -> tuple[str, list[dict[str, Any]], int]:
    """Our CLI as a child: its stdout, its JSON log lines, its peak RSS (KiB)."""
    result = subprocess.run([sys.executable, "-c", MEASURED, *args], env=env, capture_output=True, text=True, check=False)
    lines = result.stderr.strip().splitlines()
    if result.returncode != 0 or not lines or not lines[-1].startswith("peak_rss_kib "):
        raise SystemExit(f"pg-backup-sidecar {' '.join(args)} exited {result.returncode}: {result.stderr[-3000:]}")
    logs = []
    for line in lines[:-1]:
        try:
            logs.append(json.loads(line))
        except ValueError:
            continue
    if any(entry.get("level") == "error" for entry in logs):
        raise SystemExit(f"pg-backup-sidecar {' '.join(args)} logged an error: {result.stderr[-3000:]}")
    return result.stdout, logs, int(lines[-1].split()[1])


def event_time(logs: list[dict[str, Any]], event: str) -> float:
    [entry] = [e for e in logs if e.get("event") == event]
    return datetime.fromisoformat(entry["time"]).timestamp()


def plain_store(server: SeaweedServer, prefix: str) -> S3Store:
    return S3Store(BUCKET, prefix=prefix, endpoint=server.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                   secret_access_key=SECRET_KEY, client_options={"allow_http": True})


def aws_cp(server: SeaweedServer, source: Path, key: str, work: Path) -> None:
    """`aws s3 cp` with awscli's defaults (8 MiB parts, 10 in flight), no user configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=str(work / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(work / "no-aws-credentials"))
    subprocess.run([shutil.which("aws") or "aws", "s3", "cp", "--only-show-errors", "--endpoint-url", server.endpoint, str(source),
                    f"s3://{BUCKET}/{key}"], env=env, check=True)


def follow(path_glob: Callable[[], list[Path]], stop: threading.Event) -> Iterator[bytes]:
    """The bytes of a file while another process writes it: read as it grows, until it is renamed (committed) and
    read to its end. A prototype of copying while the dump is written, without touching the sidecar."""
    while not (found := path_glob()):
        if stop.is_set():
            return
        time.sleep(0.02)
    partial = found[0]
    final = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))
    pending = bytearray()  # whole 1 MiB chunks, as copy_backup reads them, not whatever the writer flushed last
    with open(partial, "rb") as handle:
        while True:
            chunk = handle.read((1 << 20) - len(pending))
            if chunk:
                pending += chunk
                if len(pending) == 1 << 20:
                    yield bytes(pending)
                    pending.clear()
                continue
            if final.exists() or stop.is_set():  # committed: the rest is already in the file
                while chunk := handle.read((1 << 20) - len(pending)):
                    pending += chunk
                    if len(pending) == 1 << 20:
                        yield bytes(pending)
                        pending.clear()
                if pending:
                    yield bytes(pending)
                return
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1000, help="database size to generate (realistic.sql)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--explain", action="store_true", help="also: part size x concurrency, and a copy while the dump is written")
    args = parser.parse_args()
    print(f"# uptime at start: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-offsite-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    os.chmod(work, 0o755)
    figures = Figures()
    rss: dict[str, list[int]] = {}
    try:
        with Cluster(base=work, port=free_ports(1)[0]) as cluster, SeaweedServer(work / "seaweed", locked_buckets=()) as server:
            figures.postgres_pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
            figures.seaweed_pid = server.process.pid if server.process else 0
            db = "bench_offsite"
            cluster.psql(f"CREATE DATABASE {db}")
            rows = args.size_mb * ROWS_PER_MB
            subprocess.run([find_tool("psql"), "-X", "-q", "-v", f"rows={rows}", "-f", str(DATASET), "-d", cluster.url(db)], check=True)
            cluster.psql("CHECKPOINT")
            size = cluster.psql(f"SELECT pg_size_pretty(pg_database_size('{db}'))")
            print(f"# database: {rows} rows, {size}; SeaweedFS up in {server.started_in:.1f} s", flush=True)
            base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BACKUP_"))}
            base_env.update(DATABASE_URL=cluster.url(db), SIDECAR_LOG_FORMAT="json", BACKUP_RETENTION_DAYS="0")
            dump: Path | None = None
            dump_bytes = 0
            for round_ in range(args.rounds):
                print(f"# round {round_ + 1}", flush=True)
                # (a) the backup alone
                local_dir = work / f"local-{round_}"
                env_a = {**base_env, "BACKUP_DIR": str(local_dir)}
                _, _, peak = figures.measure("a: backup, no remote", lambda env=env_a: run_cli(env, "backup"))  # type: ignore[misc]
                rss.setdefault("a", []).append(peak)
                shutil.rmtree(local_dir)
                # (b) the same backup with its off-site copy: the process ends once the copy is complete
                remote_dir = work / f"remote-{round_}"
                env_b = {**base_env, "BACKUP_DIR": str(remote_dir), **server.environment(f"b-{round_}")}
                if args.explain:
                    overlap(figures, server, base_env, work, round_)
                out, logs, peak = figures.measure("b: backup + off-site copy", lambda env=env_b: run_cli(env, "backup"))  # type: ignore[misc]
                rss.setdefault("b", []).append(peak)
                backup_id = out.strip().splitlines()[-1]
                copied = event_time(logs, "offsite_copied")
                completed = event_time(logs, "backup_completed")
                figures.add("b: of which the copy (backup_completed -> offsite_copied)", copied - completed)
                metadata = json.loads((remote_dir / f"{backup_id}.metadata.json").read_text())
                # (c) the finished backup uploaded again: our CLI (a process, as `aws s3 cp` is), to a new prefix
                env_c = {**env_b, **server.environment(f"c-cli-{round_}")}
                figures.measure("c: pg-backup-sidecar copy ID (process, dump + globals + metadata)",
                                lambda env=env_c, i=backup_id: run_cli(env, "copy", i))  # type: ignore[misc]
                if dump is not None:
                    dump.unlink()
                dump = work / metadata["files"]["dump"]["name"]
                shutil.move(remote_dir / metadata["files"]["dump"]["name"], dump)
                dump_bytes = dump.stat().st_size
                # (c) the dump file alone, in this process and by awscli; every case reads it from the page cache
                store = server.store(f"c-ours-{round_}")
                single = {**metadata, "files": {"dump": metadata["files"]["dump"]}}
                figures.measure("c: our copy path (copy_backup -> ObjectStore.put_stream)", lambda s=store, m=single: copy_backup(work, m, s))  # type: ignore[misc]
                plain = plain_store(server, f"c-plain-{round_}")
                figures.measure("c: obstore.put(store, name, Path)", lambda p=plain, d=dump: obstore.put(p, d.name, d))  # type: ignore[misc]
                figures.measure("c: aws s3 cp", lambda d=dump, r=round_: aws_cp(server, d, f"c-aws-{r}/{d.name}", work))  # type: ignore[misc]
                shutil.rmtree(remote_dir)
                if args.explain:
                    explain(figures, server, dump, round_)
            report(args, figures, rss, dump_bytes, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"# uptime at end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)


def explain(figures: Figures, server: SeaweedServer, dump: Path, round_: int) -> None:
    """Where the time goes in the upload alone: S3 checksums, our sha256 pass, other part sizes and concurrencies (our
    ObjectStore, same code, other parameters)."""
    checked = S3Store(BUCKET, prefix=f"x-checksum-{round_}", endpoint=server.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                      secret_access_key=SECRET_KEY, client_options={"allow_http": True}, config={"checksum_algorithm": "sha256"})
    figures.measure("x: obstore.put(Path) with S3 sha256 checksums per part (as ours)", lambda: obstore.put(checked, dump.name, dump))

    def sha256_pass() -> None:
        digest = hashlib.sha256()
        with open(dump, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    figures.measure("x: sha256 of the file in Python (our Hashing's work)", sha256_pass)
    for part_mib, concurrency in ((8, 4), (8, 8), (16, 4), (16, 8), (32, 4)):
        store = ObjectStore(server.remote(f"x-{part_mib}-{concurrency}-{round_}"), part_size=part_mib << 20, concurrency=concurrency)

        def put(s: ObjectStore = store) -> None:
            with open(dump, "rb") as handle:
                s.put_stream(dump.name, handle)
        figures.measure(f"x: put_stream {part_mib} MiB parts x {concurrency}", put)


def overlap(figures: Figures, server: SeaweedServer, base_env: dict[str, str], work: Path, round_: int) -> None:
    """Copy while written: the backup (no remote) runs; this process follows its .partial dump file and uploads it with
    our part size and concurrency, hashing as it goes; done when both are. A prototype, measured right after (a)."""
    directory = work / f"follow-{round_}"
    env = {**base_env, "BACKUP_DIR": str(directory)}
    plain = plain_store(server, f"x-follow-{round_}")
    stop = threading.Event()

    def partial() -> list[Path]:
        return [p for p in directory.glob(f"backup_*.dump*{PARTIAL_SUFFIX}")] if directory.exists() else []

    def overlapped() -> None:
        digest = hashlib.sha256()
        done: list[BaseException] = []

        def upload() -> None:
            try:
                def hashed() -> Iterator[bytes]:
                    for chunk in follow(partial, stop):
                        digest.update(chunk)
                        yield chunk
                obstore.put(plain, "followed", hashed(), use_multipart=True, chunk_size=PART_SIZE, max_concurrency=CONCURRENCY)
            except BaseException as exc:
                done.append(exc)
        uploader = threading.Thread(target=upload)
        uploader.start()
        try:
            run_cli(env, "backup")
        finally:
            stop.set()
            uploader.join()
        if done:
            raise done[0]
        [final] = [p for p in directory.glob("backup_*.dump*") if not p.name.endswith(PARTIAL_SUFFIX)]
        if hashlib.sha256(final.read_bytes()).hexdigest() != digest.hexdigest():
            raise SystemExit("the followed upload does not match the dump")
    figures.measure("x: backup with the dump uploaded while written (prototype)", overlapped)
    shutil.rmtree(directory)


def report(args: argparse.Namespace, figures: Figures, rss: dict[str, list[int]], dump_bytes: int, size: str) -> None:
    rounds = args.rounds
    a = figures.median("a: backup, no remote")
    print(f"\nDatabase {size} ({args.size_mb} MB asked), dump file {dump_bytes / 1e6:.0f} MB; medians of {rounds} rounds")
    print("\n| case | median (s) | rounds (s) | vs (a) | CPU s: client / postgres / seaweedfs / others | load before/after (1 min) |"
          "\n|---|---|---|---|---|---|")
    for case in figures.values:
        if case.startswith(("a:", "b:")) or case.startswith("x: backup"):
            m = figures.median(case)
            print(f"| {case} | {m:.2f} | {figures.spread(case)} | {m / a:.2f}x | {figures.cpu_median(case)} | {figures.load_range(case)} |")
    ours = figures.median("c: our copy path (copy_backup -> ObjectStore.put_stream)")
    print(f"\n| upload of the finished dump ({dump_bytes / 1e6:.0f} MB) | median (s) | MB/s | vs ours | CPU s: client / postgres / seaweedfs / others | load |"
          "\n|---|---|---|---|---|---|")
    for case in figures.values:
        if case.startswith(("c:", "x: put_stream", "x: obstore", "x: sha256")):
            m = figures.median(case)
            print(f"| {case[3:]} | {m:.2f} ({figures.spread(case)}) | {dump_bytes / 1e6 / m:.1f} | {m / ours:.2f}x | {figures.cpu_median(case)} "
                  f"| {figures.load_range(case)} |")
    print("\n| peak RSS of the backup process (VmHWM) | rounds (MiB) |\n|---|---|")
    for key, label in (("a", "a: no remote"), ("b", "b: with the off-site copy")):
        print(f"| {label} | {'/'.join(str(v // 1024) for v in rss[key])} |")
    print(f"\nratio b/a (median): {figures.median('b: backup + off-site copy') / a:.2f}x (goal <= 1.2x); "
          f"peak RSS with the copy: {max(rss['b']) // 1024} MiB (goal < 100 MB)")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"obstore {obstore.__version__}, {subprocess.run([shutil.which('aws') or 'aws', '--version'], capture_output=True, text=True).stdout.strip()}, "
          f"{subprocess.run([find_tool('pg_dump'), '--version'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
