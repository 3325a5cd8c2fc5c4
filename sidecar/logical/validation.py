"""Data consistency checks, generic for any schema, read from the catalog.

Each check is a small named function returning findings. Every query runs in its own read-only
transaction with a statement timeout; a query that times out or fails is a finding of its own kind
("could_not_verify"), never a silent pass."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import psycopg
from psycopg import sql

from sidecar import postgres
from sidecar.config import Config
from sidecar.errors import SidecarError

log = logging.getLogger(__name__)

SAMPLE = 5
USER_ROWS_CAP = 1000


@dataclass(frozen=True)
class Finding:
    check: str
    object: str
    count: int | None
    message: str
    sample: list[str] = field(default_factory=list)
    kind: str = "violation"  # violation | could_not_verify


@dataclass
class ValidationResult:
    findings: list[Finding] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def is_valid(self) -> bool:
        return not self.findings

    @property
    def errors(self) -> list[str]:
        return [f"{f.check}: {f.message}" for f in self.findings]

    def counts_by_check(self) -> dict[str, int]:
        """Findings per check (for pg_backup_validation_failures_total{check})."""
        return dict(Counter(f.check for f in self.findings))

    def to_json(self, samples: bool = True) -> dict[str, Any]:
        """samples=False leaves out row values (kept out of the plaintext metadata of an encrypted backup)."""
        return {"ok": self.is_valid, "findings": [asdict(f) if samples else {**asdict(f), "sample": []} for f in self.findings],
                "checkSeconds": {k: round(v, 3) for k, v in self.timings.items()}}


def split_known(findings: list[Finding], recorded: dict[str, Any] | None) -> tuple[list[Finding], list[Finding]]:
    """(new, known): a finding is known when the validation recorded at backup time has one of the same check,
    object and kind with at least as many rows. The database had it before the backup, so the round trip did
    not cause it. Without a recorded validation every finding is new."""
    seen: dict[tuple[str, str, str], int | None] = {}
    for item in (recorded or {}).get("findings") or []:
        if isinstance(item, dict) and isinstance(item.get("check"), str) and isinstance(item.get("object"), str):
            seen[(item["check"], item["object"], item.get("kind", "violation"))] = item.get("count")
    new, known = [], []
    for finding in findings:
        key = (finding.check, finding.object, finding.kind)
        if key in seen and (finding.count is None or seen[key] is None or finding.count <= (seen[key] or 0)):
            known.append(finding)
        else:
            new.append(finding)
    return new, known


class Runner:
    """Runs each query in its own read-only transaction with a statement timeout."""

    def __init__(self, conn: psycopg.Connection[Any], timeout_seconds: int) -> None:
        self.conn = conn
        self.timeout_ms = str(timeout_seconds * 1000)

    def rows(self, query: sql.Composed | sql.SQL | str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION READ ONLY")
            self.conn.execute("SELECT set_config('statement_timeout', %s, true)", (self.timeout_ms,))
            return self.conn.execute(query, params or None).fetchall()


class CouldNotVerify(Exception):
    pass


def _guard(check: str, obj: str, action: Callable[[], list[Finding]]) -> list[Finding]:
    try:
        return action()
    except psycopg.errors.QueryCanceled:
        return [Finding(check, obj, None, f"{obj}: could not verify within the statement timeout; raise validation.statement_timeout_seconds",
                        kind="could_not_verify")]
    except psycopg.Error as exc:
        if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
            raise
        return [Finding(check, obj, None, f"{obj}: could not verify ({postgres.describe(exc)})", kind="could_not_verify")]


def _table(schema: str, name: str, kind: str) -> sql.Composable:
    """ONLY for plain tables (inheritance children are not covered by their parent's constraints)."""
    ident = sql.Identifier(schema, name)
    return ident if kind == "p" else sql.SQL("ONLY {}").format(ident)


USER_TABLE = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'"

FOREIGN_KEYS = f"""
SELECT c.conname, n.nspname, r.relname, r.relkind, pn.nspname, p.relname, p.relkind, c.convalidated,
       ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(num, i)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.num ORDER BY k.i),
       ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(num, i)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.num ORDER BY k.i)
  FROM pg_constraint c
  JOIN pg_class r ON r.oid = c.conrelid JOIN pg_namespace n ON n.oid = r.relnamespace
  JOIN pg_class p ON p.oid = c.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
 WHERE c.contype = 'f' AND c.conparentid = 0 AND {USER_TABLE}
 ORDER BY 2, 3, 1
"""


def _count_with_sample(run: Runner, check: str, obj: str, source: sql.Composable, where: sql.Composable, key: sql.Composable | None,
                       message: str) -> list[Finding]:
    """One finding with the count of rows of `source` matching `where`, and a few of them, or none."""
    count = run.rows(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(source, where))[0][0]
    if not count:
        return []
    sample = [r[0] for r in run.rows(sql.SQL("SELECT {} FROM {} WHERE {} LIMIT {}").format(key, source, where, sql.Literal(SAMPLE)))] if key else []
    return [Finding(check, obj, count, f"{count} {message}", sample)]


def foreign_key_queries(run: Runner) -> list[tuple[str, sql.Composable, sql.Composable, sql.Composable, str]]:
    """Per foreign key: (object, source, where, sample key, message); `SELECT count(*) FROM source WHERE where` is
    one anti-join of the child against the parent (bench/bench_validation.py checks its plan)."""
    queries: list[tuple[str, sql.Composable, sql.Composable, sql.Composable, str]] = []
    for conname, schema, table, kind, pschema, ptable, pkind, validated, cols, pcols in run.rows(FOREIGN_KEYS):
        obj = f"{schema}.{table}.{conname}"
        child, parent = sql.Identifier("c"), sql.Identifier("p")
        not_null = sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(sql.Identifier("c", col)) for col in cols)
        match = sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier("p", pc), sql.Identifier("c", cc)) for cc, pc in zip(cols, pcols, strict=True))
        where = sql.SQL("{} AND NOT EXISTS (SELECT 1 FROM {} {} WHERE {})").format(not_null, _table(pschema, ptable, pkind), parent, match)
        key = sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier("c", col) for col in cols))

        source = sql.SQL("{} {}").format(_table(schema, table, kind), child)
        note = "" if validated else " (constraint is NOT VALID)"
        queries.append((obj, source, where, key, f"rows of {schema}.{table} reference missing rows of {pschema}.{ptable}{note}"))
    return queries


def check_foreign_keys(run: Runner, config: Config) -> list[Finding]:
    """Child rows whose non-null key has no parent: orphans left by NOT VALID keys, triggers bypassed
    with session_replication_role = replica, or corruption. MATCH SIMPLE semantics."""
    findings = []
    for obj, source, where, key, message in foreign_key_queries(run):
        findings += _guard("foreign_keys", obj, partial(_count_with_sample, run, "foreign_keys", obj, source, where, key, message))
    return findings


NOT_VALID_CHECKS = f"""
SELECT c.conname, n.nspname, r.relname, r.relkind, pg_get_expr(c.conbin, c.conrelid)
  FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid JOIN pg_namespace n ON n.oid = r.relnamespace
 WHERE c.contype = 'c' AND NOT c.convalidated AND c.conparentid = 0 AND {USER_TABLE}
 ORDER BY 2, 3, 1
"""

NOT_VALID_DOMAINS = f"""
SELECT c.conname, format('%I.%I', tn.nspname, t.typname), n.nspname, r.relname, r.relkind, a.attname, pg_get_expr(c.conbin, 0)
  FROM pg_constraint c JOIN pg_type t ON t.oid = c.contypid JOIN pg_namespace tn ON tn.oid = t.typnamespace
  JOIN pg_attribute a ON a.atttypid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_class r ON r.oid = a.attrelid AND r.relkind IN ('r', 'p') JOIN pg_namespace n ON n.oid = r.relnamespace
 WHERE c.contype = 'c' AND NOT c.convalidated AND {USER_TABLE}
 ORDER BY 2, 3, 4
"""


def check_constraints(run: Runner, config: Config) -> list[Finding]:
    """Rows violating NOT VALID CHECK constraints of tables and of domains (PostgreSQL let them in).
    One scan per table, counting every constraint on it at once; if that scan fails (say, one expression
    raises an error) each constraint is counted alone, so the findings are those of one query per constraint."""
    items: list[tuple[str, tuple[str, str, str], sql.Composable, str]] = []  # (object, table, condition, message)
    for conname, schema, table, kind, expr in run.rows(NOT_VALID_CHECKS):
        items.append((f"{schema}.{table}.{conname}", (schema, table, kind), sql.SQL(expr),
                      f"rows of {schema}.{table} violate CHECK {conname} (NOT VALID)"))
    for conname, domain, schema, table, kind, column, expr in run.rows(NOT_VALID_DOMAINS):
        column_sql = sql.Identifier(column).as_string(run.conn)
        obj = f"{schema}.{table}.{column}"
        items.append((obj, (schema, table, kind), sql.SQL(re.sub(r"\bVALUE\b", column_sql, expr)),
                      f"rows of {obj} violate domain {domain} constraint {conname} (NOT VALID)"))

    def alone(index: int) -> list[Finding]:
        obj, (schema, table, kind), condition, message = items[index]
        where = sql.SQL("({}) IS FALSE").format(condition)
        return _guard("check_constraints", obj, partial(_count_with_sample, run, "check_constraints", obj, _table(schema, table, kind), where, None, message))

    by_table: dict[tuple[str, str, str], list[int]] = {}
    for index, item in enumerate(items):
        by_table.setdefault(item[1], []).append(index)
    results: dict[int, list[Finding]] = {}
    for (schema, table, kind), indexes in by_table.items():
        if len(indexes) == 1:
            results[indexes[0]] = alone(indexes[0])
            continue
        counts = sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE ({}) IS FALSE)").format(items[i][2]) for i in indexes)
        try:
            row = run.rows(sql.SQL("SELECT {} FROM {}").format(counts, _table(schema, table, kind)))[0]
        except psycopg.errors.QueryCanceled as exc:
            for i in indexes:
                results[i] = _guard("check_constraints", items[i][0], partial(_raise, exc))
            continue
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
                raise
            for i in indexes:
                results[i] = alone(i)
            continue
        for i, count in zip(indexes, row, strict=True):
            results[i] = [Finding("check_constraints", items[i][0], count, f"{count} {items[i][3]}")] if count else []
    return [finding for index in range(len(items)) for finding in results[index]]


def _raise(exc: Exception) -> list[Finding]:
    raise exc


INVALID_INDEXES = f"""
SELECT format('%I.%I', n.nspname, c.relname), format('%I.%I', n.nspname, t.relname), c.relkind,
       ARRAY(SELECT format('%I.%I', pn.nspname, p.relname)
               FROM pg_inherits pi JOIN pg_class p ON p.oid = pi.inhrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
              WHERE pi.inhparent = t.oid
                AND NOT EXISTS (SELECT FROM pg_inherits ii JOIN pg_index x ON x.indexrelid = ii.inhrelid
                                 WHERE ii.inhparent = c.oid AND x.indrelid = p.oid AND x.indisvalid)
              ORDER BY 1)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE NOT i.indisvalid AND {USER_TABLE}
 ORDER BY 1
"""


def check_invalid_indexes(run: Runner, config: Config) -> list[Finding]:
    """Indexes left invalid: a failed CREATE INDEX CONCURRENTLY (REINDEX fixes it), or a partitioned index
    created ON ONLY the parent that some partitions have no valid index attached to (REINDEX does not help:
    attach or create the partitions' indexes)."""
    findings = []
    for index, table, kind, unattached in run.rows(INVALID_INDEXES):
        if kind == "I":
            missing = ", ".join(unattached[:SAMPLE]) + (f" and {len(unattached) - SAMPLE} more" if len(unattached) > SAMPLE else "")
            message = (f"partitioned index {index} on {table} is invalid: partitions without a valid index attached to it: {missing or 'none found'}; "
                       f"ALTER INDEX {index} ATTACH PARTITION <an index on each of them> (create it first if needed)")
            findings.append(Finding("invalid_indexes", index, 1, message, list(unattached[:SAMPLE])))
        else:
            findings.append(Finding("invalid_indexes", index, 1, f"index {index} on {table} is invalid (a failed CREATE INDEX CONCURRENTLY?); "
                                    f"REINDEX INDEX CONCURRENTLY {index} or drop it"))
    return findings


BTREE_INDEXES = f"""
SELECT c.oid, format('%I.%I', n.nspname, c.relname)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE am.amname = 'btree' AND c.relkind = 'i' AND i.indisvalid AND i.indisready AND c.relpersistence <> 't' AND {USER_TABLE}
 ORDER BY 2
"""


def check_btree_indexes(run: Runner, config: Config) -> list[Finding]:
    """amcheck's bt_index_check on every B-tree index (only with validation.amcheck: it reads every index)."""
    if not config.validation_amcheck:
        return []
    schema = run.rows("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'amcheck'")
    if not schema:
        return [Finding("btree_indexes", "amcheck", None, "validation.amcheck is on but the amcheck extension is not installed; CREATE EXTENSION amcheck",
                        kind="could_not_verify")]
    function = sql.Identifier(schema[0][0], "bt_index_check")
    findings = []
    for oid, name in run.rows(BTREE_INDEXES):
        def one(oid: int = oid, name: str = name) -> list[Finding]:
            try:
                run.rows(sql.SQL("SELECT {}(%s::regclass)").format(function), (oid,))
            except psycopg.errors.IndexCorrupted as exc:
                return [Finding("btree_indexes", name, 1, f"index {name} is corrupt ({postgres.describe(exc)}); REINDEX it")]
            return []

        findings += _guard("btree_indexes", name, one)
    return findings


OWNED_SEQUENCES = f"""
SELECT sn.nspname, s.relname, n.nspname, t.relname, a.attname, q.seqincrement
  FROM pg_depend d
  JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' JOIN pg_namespace sn ON sn.oid = s.relnamespace
  JOIN pg_sequence q ON q.seqrelid = s.oid
  JOIN pg_class t ON t.oid = d.refobjid AND t.relkind IN ('r', 'p') JOIN pg_namespace n ON n.oid = t.relnamespace
  JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
 WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND {USER_TABLE}
   -- the sequence still feeds the column: it is the column's identity sequence, or its default calls it
   -- (an old serial sequence stays owned by its column after the column became an identity column)
   AND ((d.deptype = 'i' AND a.attidentity <> '')
        OR (d.deptype = 'a' AND a.attidentity = '' AND EXISTS (
              SELECT FROM pg_attrdef ad JOIN pg_depend dd ON dd.classid = 'pg_attrdef'::regclass AND dd.objid = ad.oid
               WHERE ad.adrelid = t.oid AND ad.adnum = a.attnum AND dd.refclassid = 'pg_class'::regclass AND dd.refobjid = s.oid)))
   -- and a value it hands out can collide: a unique index (or primary key) on that column alone
   AND EXISTS (SELECT FROM pg_index ui WHERE ui.indrelid = t.oid AND ui.indisunique AND ui.indnkeyatts = 1 AND ui.indkey[0] = a.attnum)
 ORDER BY 1, 2
"""


def check_sequences(run: Runner, config: Config) -> list[Finding]:
    """A sequence owned by a column must be ahead of the column's values, or the next insert collides."""
    findings = []
    for seq_schema, seq, schema, table, column, increment in run.rows(OWNED_SEQUENCES):
        obj = f"{seq_schema}.{seq}"

        def one(seq_schema: str = seq_schema, seq: str = seq, schema: str = schema, table: str = table, column: str = column,
                increment: int = increment, obj: str = obj) -> list[Finding]:
            last, called = run.rows(sql.SQL("SELECT last_value, is_called FROM {}").format(sql.Identifier(seq_schema, seq)))[0]
            upward = increment > 0
            extreme = run.rows(sql.SQL("SELECT {}({}) FROM {}").format(sql.SQL("max" if upward else "min"), sql.Identifier(column),
                                                                       sql.Identifier(schema, table)))[0][0]
            following = last + increment if called else last
            if extreme is None or (extreme < following if upward else extreme > following):
                return []
            return [Finding("sequences", obj, 1,
                            f"sequence {obj} would next give {following} but {schema}.{table}.{column} already holds {extreme}; "
                            f"SELECT setval('{obj}', {extreme})", [f"{'max' if upward else 'min'}({column}) = {extreme}", f"next value = {following}"])]

        findings += _guard("sequences", obj, one)
    return findings


def check_user_queries(run: Runner, config: Config) -> list[Finding]:
    """Named SQL queries from config.yaml (validation.checks) that must return no rows."""
    findings = []
    for name, query in config.validation_checks:
        body = sql.SQL(query.strip().rstrip(";"))

        def one(name: str = name, body: sql.Composable = body) -> list[Finding]:
            # no query parameters: a user's SQL may hold a literal % (LIKE 'a%'), which psycopg would take for a placeholder
            rows = run.rows(sql.SQL("SELECT q::text FROM ({}) q LIMIT {}").format(body, sql.Literal(USER_ROWS_CAP + 1)))
            if not rows:
                return []
            count = len(rows)
            shown = f"{USER_ROWS_CAP}+" if count > USER_ROWS_CAP else str(count)
            return [Finding("user_checks", name, min(count, USER_ROWS_CAP), f"user check {name} returned {shown} rows", [r[0] for r in rows[:SAMPLE]])]

        findings += _guard("user_checks", name, one)
    return findings


CHECKS: dict[str, Callable[[Runner, Config], list[Finding]]] = {
    "foreign_keys": check_foreign_keys,
    "check_constraints": check_constraints,
    "invalid_indexes": check_invalid_indexes,
    "btree_indexes": check_btree_indexes,
    "sequences": check_sequences,
    "user_checks": check_user_queries,
}


def validate(config: Config, dbname: str | None = None, only: Iterable[str] | None = None, quiet: bool = False) -> ValidationResult:
    """Run every enabled check against the database (or `dbname` on the same server); quiet: the caller logs the findings."""
    conn = postgres.connect(config, dbname=dbname)
    result = ValidationResult()
    try:
        run = Runner(conn, config.validation_timeout_seconds)
        for name, check in CHECKS.items():
            if name in config.validation_disabled or (only is not None and name not in only):
                continue
            started = time.monotonic()
            result.findings += check(run, config)
            result.timings[name] = time.monotonic() - started
    except psycopg.Error as exc:
        raise SidecarError(f"validation could not run: {postgres.describe(exc)}") from None
    finally:
        conn.close()
    for finding in [] if quiet else result.findings:
        log.warning("validation: %s: %s", finding.check, finding.message)
    return result
