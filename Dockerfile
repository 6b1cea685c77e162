# syntax=docker/dockerfile:1
# The ext_proc server image: `extproc serve`, gRPC on :50051, Prometheus metrics on :9464.
#
#   docker build -t extproc-gateway .                                      # the server
#   docker build --target fake-provider -t extproc-fake-provider .         # demo/test only
#
# Slim Debian base, a virtualenv holding only the pinned runtime dependencies (every
# wheel checked against the hashes in deploy/requirements.lock), no compiler, no pip in
# the final image, and a non-root user. Envoy is not in it: it runs as its own container
# or is already there (mesh). Regenerate the lock after changing dependencies in
# pyproject.toml (the command is at the top of deploy/requirements.lock).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY deploy/requirements.lock /tmp/requirements.lock
# --no-deps: the lock is complete, so nothing unpinned can slip in.
# xds-protos ships an old copy of opentelemetry/proto; the locked opentelemetry-proto is
# installed again afterwards so the OTLP exporters get theirs.
RUN python -m venv /opt/extproc \
    && /opt/extproc/bin/pip install --no-cache-dir --require-hashes --no-deps \
       -r /tmp/requirements.lock \
    && awk '/^[a-z]/{keep = /^opentelemetry-proto==/} keep' /tmp/requirements.lock \
       > /tmp/otel-proto.lock \
    && /opt/extproc/bin/pip install --no-cache-dir --require-hashes --no-deps \
       --force-reinstall -r /tmp/otel-proto.lock
COPY pyproject.toml README.md /src/
COPY extproc /src/extproc
# The project itself, built with the locked setuptools (no build isolation, so no
# unpinned download), then the installers are removed: the image never installs again.
RUN /opt/extproc/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && /opt/extproc/bin/python -m compileall -q /opt/extproc/lib \
    && /opt/extproc/bin/pip uninstall --yes setuptools pip
COPY deploy/healthcheck.py /opt/extproc/healthcheck.py

# ---------------------------------------------------------------------------- fake provider
# tests/fake_provider.py as a service, for `docker compose --profile fake up`. Never used in
# production; a separate stage so its aiohttp stack stays out of the server image.
FROM ${PYTHON_IMAGE} AS fake-provider
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
COPY deploy/fake-provider.lock /tmp/fake-provider.lock
RUN python -m venv /opt/fake \
    && /opt/fake/bin/pip install --no-cache-dir --require-hashes --no-deps \
       -r /tmp/fake-provider.lock
COPY tests/fake_provider.py /opt/fake/fake_provider.py
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/opt/fake/bin/python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8000), 2).close()"]
ENTRYPOINT ["/opt/fake/bin/python", "/opt/fake/fake_provider.py", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="extproc-gateway" \
      org.opencontainers.image.description="LLM gateway: Envoy external-processing (ext_proc) gRPC server" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid so Kubernetes runAsNonRoot can verify it and volume permissions
# are predictable; no home directory, no login shell.
RUN groupadd --system --gid 10001 extproc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin extproc
COPY --from=build /opt/extproc /opt/extproc
COPY deploy/container-gateway.yaml /etc/extproc/gateway.yaml
ENV PATH=/opt/extproc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
# 50051: ext_proc gRPC (+ gRPC health); 9464: Prometheus /metrics.
EXPOSE 50051 9464
# SIGTERM starts the graceful stop: NOT_SERVING, --drain seconds still accepting, then
# --grace seconds for open streams. Give the container at least drain + grace to stop
# (docker stop -t / stop_grace_period / terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "/opt/extproc/healthcheck.py", "127.0.0.1:50051"]
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/extproc/gateway.yaml", "--drain", "15", "--grace", "600"]
