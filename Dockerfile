# syntax=docker/dockerfile:1
# dlq-worker image: multi-stage, slim runtime, non-root, exec-form entrypoint (PID 1 gets SIGTERM).
#
#   docker build -t dlq-worker .
#   docker run --rm -e REDIS_ADDR=redis:6379 -e DB_HOST=postgres -e DB_PASSWORD=... dlq-worker
#
# BASE_IMAGE must provide python3 (>= 3.11) with venv; machines without a registry can
# build one locally (see .ci/images.sh) and pass --build-arg BASE_IMAGE=localhost/...
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
# Build-time only (never in the final image): a CA bundle for machines behind a TLS proxy.
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/dlq-worker
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dlq_worker ./dlq_worker
RUN /opt/dlq-worker/bin/pip install --upgrade pip \
 && /opt/dlq-worker/bin/pip install . \
 && /opt/dlq-worker/bin/dlq-worker --version

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="dlq-worker" \
      org.opencontainers.image.description="Drains the audit dead-letter-queue Redis Streams into PostgreSQL without losing a record." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 dlq \
 && useradd --system --uid 10001 --gid dlq --no-create-home --shell /usr/sbin/nologin dlq
COPY --from=build /opt/dlq-worker /opt/dlq-worker
COPY worker.yaml /etc/dlq-worker/worker.example.yaml
ENV PATH=/opt/dlq-worker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DLQ_WORKER_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
# Kubernetes uses the chart's probes; this is for plain docker.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["dlq-worker"]
CMD ["run"]
