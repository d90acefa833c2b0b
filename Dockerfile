# tokenwire server image. From the repository root:
#
#   podman build --format docker -t tokenwire:0.1.0 .    # or: docker build -t tokenwire:0.1.0 .
#   podman run --rm -p 50051:50051 -p 9464:9464 tokenwire:0.1.0
#
# (--format docker keeps the HEALTHCHECK; podman's default OCI format drops it.)
# docs/operations.md, "Container image", has the details and how the build was
# proven without a registry; tests/test_container_image.py checks this file.
#
# Both stages start from the same Python image (the virtualenv built in the
# first links to that image's interpreter). Any Debian-like image with Python
# 3.11+, its venv module and pip works: --build-arg PYTHON_IMAGE=...
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

# ---- build: wheels of both distributions, installed into /opt/tokenwire -----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/tokenwire
WORKDIR /src
# Only what the two distributions are built from (.dockerignore keeps the rest
# of the checkout out of the context): the client `tokenwire` (clients/python:
# the stubs and the `tokenwire` command) and the server `tokenwire-server`
# (pyproject.toml + server/, which adds `serve`, `audit` and `keys`).
COPY clients/python/ clients/python/
COPY pyproject.toml README.md ./
COPY server/ server/
RUN /opt/tokenwire/bin/pip wheel --no-deps --wheel-dir /wheels ./clients/python . \
 && /opt/tokenwire/bin/pip install /wheels/*.whl \
 && /opt/tokenwire/bin/pip check
# The image is checked while it is built: the packages import and `tokenwire
# serve` accepts the configuration the image ships.
COPY deploy/tokenwire.example.toml /src/tokenwire.toml
RUN /opt/tokenwire/bin/python -c "import tokenwire_server.server, tokenwire.v1.respond_pb2" \
 && /opt/tokenwire/bin/tokenwire serve --check-config --config /src/tokenwire.toml \
      --host 0.0.0.0 --audit-path :memory:

# ---- runtime: the interpreter, the virtualenv, the config; no build tools ----
FROM ${PYTHON_IMAGE} AS runtime
# uid/gid 10001: what deploy/kubernetes/deployment.yaml's runAsUser expects.
RUN groupadd --system --gid 10001 tokenwire \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/tokenwire --shell /usr/sbin/nologin tokenwire \
 && mkdir -p /var/lib/tokenwire /etc/tokenwire \
 && chown 10001:10001 /var/lib/tokenwire
COPY --from=build /opt/tokenwire /opt/tokenwire
COPY deploy/tokenwire.example.toml /etc/tokenwire/tokenwire.toml
COPY deploy/healthcheck.py /opt/tokenwire/share/healthcheck.py
# Only what the image's own EXPOSE and writable directory depend on is set
# here (env outranks the file: flag, env, file, default); everything else comes
# from /etc/tokenwire/tokenwire.toml, the example config with every default
# (mount your own over it, as deploy/kubernetes does). The audit trail and any
# other relative path land in the working directory, /var/lib/tokenwire (make
# it a volume to keep them).
ENV PATH=/opt/tokenwire/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENWIRE_CONFIG=/etc/tokenwire/tokenwire.toml \
    TOKENWIRE_HOST=0.0.0.0 \
    TOKENWIRE_PORT=50051 \
    TOKENWIRE_METRICS_HOST=0.0.0.0 \
    TOKENWIRE_METRICS_PORT=9464
WORKDIR /var/lib/tokenwire
USER 10001:10001
# gRPC (tokenwire.v1, grpc.health.v1, reflection) and Prometheus /metrics.
EXPOSE 50051 9464
# grpc.health.v1 Check for "" over plaintext, with the image's own Python (no
# grpc_health_probe binary); NOT_SERVING from the start of a drain.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/tokenwire/bin/python", "/opt/tokenwire/share/healthcheck.py"]
# The console script is PID 1, so SIGTERM reaches the server's drain.
ENTRYPOINT ["tokenwire"]
CMD ["serve"]
