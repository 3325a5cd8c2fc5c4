# syntax=docker/dockerfile:1
# pg-backup-sidecar: multi-stage, the package installed as a wheel into a venv, non-root,
# read-only-root friendly. Build: podman/docker build -t pg-backup-sidecar .
ARG BASE=docker.io/library/debian:trixie-slim
# PostgreSQL major version of the client (pg_dump can dump older servers, never newer ones) and of the server binaries
# the point-in-time restore runs as a scratch instance (it must match the live server's major). Debian trixie ships 17;
# another major needs an apt source that has postgresql-<major> (apt.postgresql.org) in the base image.
ARG PG_MAJOR=17

FROM ${BASE} AS build
# a CA bundle for pip when the build runs behind an intercepting proxy (harmless elsewhere)
ARG PIP_CERT=""
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python3 -m venv /opt/venv \
 && PIP_CERT="${PIP_CERT}" /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && PIP_CERT="${PIP_CERT}" /opt/venv/bin/pip wheel --no-cache-dir --wheel-dir /wheels . \
 && PIP_CERT="${PIP_CERT}" /opt/venv/bin/pip install --no-cache-dir /wheels/*.whl


# Only the server binaries a scratch instance needs (postgres, pg_ctl, initdb), their libraries and share files, taken
# out of Debian's package: installing postgresql-${PG_MAJOR} itself would also bring perl, postgresql-common, ssl-cert
# and LLVM (JIT, ~120 MB) that a recovery never uses.
FROM ${BASE} AS server
ARG PG_MAJOR
WORKDIR /tmp
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get download "postgresql-${PG_MAJOR}" \
 && dpkg-deb -x postgresql-"${PG_MAJOR}"_*.deb /x \
 && mkdir -p /out/usr/lib/postgresql/"${PG_MAJOR}"/bin /out/usr/share/postgresql \
 && cp -a /x/usr/lib/postgresql/"${PG_MAJOR}"/bin/postgres /x/usr/lib/postgresql/"${PG_MAJOR}"/bin/pg_ctl \
          /x/usr/lib/postgresql/"${PG_MAJOR}"/bin/initdb /out/usr/lib/postgresql/"${PG_MAJOR}"/bin/ \
 && cp -a /x/usr/lib/postgresql/"${PG_MAJOR}"/lib /out/usr/lib/postgresql/"${PG_MAJOR}"/ \
 && rm -rf /out/usr/lib/postgresql/"${PG_MAJOR}"/lib/llvmjit* /out/usr/lib/postgresql/"${PG_MAJOR}"/lib/bitcode \
 && cp -a /x/usr/share/postgresql/"${PG_MAJOR}" /out/usr/share/postgresql/ \
 && rm -rf /out/usr/share/postgresql/"${PG_MAJOR}"/man /var/lib/apt/lists/*

FROM ${BASE}
ARG PG_MAJOR
LABEL org.opencontainers.image.title="pg-backup-sidecar" \
      org.opencontainers.image.description="PostgreSQL backups that provably restore: scheduled pg_dump, checksums, zstd, age, drills, metrics" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"
# Debian's stable packages take security fixes under the same name; pinning their versions would break the build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 "postgresql-client-${PG_MAJOR}" age zstd tini ca-certificates \
      libicu76 libxml2 tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sidecar \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sidecar \
 && mkdir -p /backups && chown 10001:10001 /backups
COPY --from=server /out/usr/ /usr/
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    BACKUP_DIR=/backups \
    PG_BIN_DIR=/usr/lib/postgresql/${PG_MAJOR}/bin \
    TMPDIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
VOLUME ["/backups"]
EXPOSE 9188
ENTRYPOINT ["/usr/bin/tini", "--", "pg-backup-sidecar"]
CMD ["run"]
