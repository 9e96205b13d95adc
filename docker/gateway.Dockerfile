# The gateway: a small, stateless HTTP service in front of Triton. No GPU, no model weights
# (only the tokenizer files of the served models, mounted read-only, to count prompt tokens).
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t triton-completions-gateway .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway

WORKDIR /opt/triton-completions
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY build_engines ./build_engines
COPY cpu_engine ./cpu_engine
COPY triton_models ./triton_models
COPY model_repository ./model_repository
# The gateway's own dependencies only (no Triton server, no engine): `pip install .` without extras.
RUN python -m pip install --no-cache-dir . \
 && mkdir /data && chown 10001 /data

USER 10001
EXPOSE 8080
# /data: the usage ledger's SQLite file and spill files (a volume; or set GATEWAY_LEDGER_DSN for PostgreSQL).
ENV GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8080 GATEWAY_DATA_DIR=/data
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=6s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=5)"]

ENTRYPOINT ["python", "-m", "gateway", "serve"]
CMD ["--config", "/etc/gateway/gateway.toml"]
