# Triton with TensorRT-LLM (NVIDIA's NGC release) plus this project's Python-backend models
# (preprocessing, postprocessing, the CPU engine) and build_engines, so that engines are built by the
# same TensorRT-LLM that serves them.
#
# TRITON_VERSION must equal `[container] version` in build_engines/targets.toml (a test checks it).
# Build from the repository root:  docker build -f docker/triton.Dockerfile -t triton-completions-triton .
# Run with a large /dev/shm (the Python backend passes tensors through it): --shm-size=2g or more.
ARG TRITON_VERSION=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-trtllm-python-py3

# The NGC image carries TensorRT-LLM's Python package but not its examples, whose convert_checkpoint.py and
# quantize.py the engine build runs: take them from the source of the same release, at the path
# build_engines/targets.toml names (`[container] examples_dir`; a test checks all three agree).
ARG TENSORRT_LLM_VERSION=0.14.0
ARG TENSORRT_LLM_EXAMPLES=/app/tensorrt_llm/examples
ADD https://github.com/NVIDIA/TensorRT-LLM/archive/refs/tags/v${TENSORRT_LLM_VERSION}.tar.gz /tmp/tensorrt_llm.tar.gz
RUN mkdir -p "${TENSORRT_LLM_EXAMPLES}" \
 && tar -xzf /tmp/tensorrt_llm.tar.gz -C "${TENSORRT_LLM_EXAMPLES}" --strip-components=2 \
      "TensorRT-LLM-${TENSORRT_LLM_VERSION}/examples" \
 && rm /tmp/tensorrt_llm.tar.gz

WORKDIR /opt/triton-completions
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY build_engines ./build_engines
COPY cpu_engine ./cpu_engine
COPY triton_models ./triton_models
COPY model_repository ./model_repository
# The image's own Python is the one the Python backend stub runs; install into it. Versions are pinned by
# pyproject.toml (a local path, not a package name, hence DL3013 off).
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir '.[models]'

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
  CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]

# tritonserver in the foreground; under mpirun with one rank per GPU when the engine spans several.
ENTRYPOINT ["python3", "-m", "triton_models.serve"]
CMD ["--repository", "/repository"]
