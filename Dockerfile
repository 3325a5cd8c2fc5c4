# syntax=docker/dockerfile:1
# pg-backup-sidecar: multi-stage, the package installed as a wheel into a venv, non-root,
# read-only-root friendly. Build: podman/docker build -t pg-backup-sidecar .
ARG BASE=docker.io/library/debian:trixie-slim

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

FROM ${BASE}
# PostgreSQL client major version: pg_dump can dump older servers, never newer ones (trixie: 17)
ARG PG_MAJOR=17
LABEL org.opencontainers.image.title="pg-backup-sidecar" \
      org.opencontainers.image.description="PostgreSQL backups that provably restore: scheduled pg_dump, checksums, zstd, age, drills, metrics" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"
# Debian's stable packages take security fixes under the same name; pinning their versions would break the build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 "postgresql-client-${PG_MAJOR}" age zstd tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sidecar \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sidecar \
 && mkdir -p /backups && chown 10001:10001 /backups
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
