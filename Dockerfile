# syntax=docker/dockerfile:1
# pg-backup-sidecar: multi-stage, the package installed as a wheel, non-root, read-only-root friendly.
ARG DEBIAN_RELEASE=trixie

FROM docker.io/library/python:3.11-slim-${DEBIAN_RELEASE} AS build
ARG PIP_CERT=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN PIP_CERT="${PIP_CERT}" pip wheel --no-cache-dir --wheel-dir /wheels .

FROM docker.io/library/python:3.11-slim-${DEBIAN_RELEASE}
# PostgreSQL client major version: pg_dump can dump older servers, never newer ones
ARG PG_MAJOR=17
ARG PIP_CERT=""
LABEL org.opencontainers.image.title="pg-backup-sidecar" \
      org.opencontainers.image.description="PostgreSQL backups that provably restore: scheduled pg_dump, checksums, zstd, age, drills, metrics" \
      org.opencontainers.image.source="https://example.invalid/pg-backup-sidecar" \
      org.opencontainers.image.licenses="MIT"
# Debian's stable packages take security fixes under the same name; pinning their versions would break the build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}" age zstd tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN PIP_CERT="${PIP_CERT}" pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && groupadd --gid 10001 sidecar && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sidecar \
 && mkdir -p /backups && chown 10001:10001 /backups
ENV BACKUP_DIR=/backups \
    PG_BIN_DIR=/usr/lib/postgresql/${PG_MAJOR}/bin \
    TMPDIR=/backups \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
VOLUME ["/backups"]
EXPOSE 9188
ENTRYPOINT ["/usr/bin/tini", "--", "pg-backup-sidecar"]
CMD ["run"]
