# syntax=docker/dockerfile:1
# Keel's training image for CPU-only nodes (laptops, CI-like clusters): the same entrypoint as
# docker/train.Dockerfile, with the CPU build of torch. Build from the repository root, naming
# PyTorch's CPU wheel index (pytorch.org, "Get started": Linux, Pip, CPU):
#   docker build -f docker/train-cpu.Dockerfile --build-arg TORCH_INDEX_URL=<index> -t keel-train:0.1.0-cpu .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN test -n "$TORCH_INDEX_URL" || { echo "pass --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index>"; exit 1; } \
 && python -m venv /opt/keel
ENV PATH=/opt/keel/bin:$PATH
COPY docker/requirements/train-cpu.txt /tmp/requirements.txt
RUN pip install pip==26.3 \
 && pip install --extra-index-url "$TORCH_INDEX_URL" -r /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY data /src/data
COPY trainer /src/trainer
COPY keel /src/keel
COPY serving /src/serving
RUN pip install --no-deps /src \
 && pip check \
 && python -c "import keel.launch.pod_entrypoint, trainer.train"

FROM ${PYTHON_IMAGE}
# Keel's user is 10001 in every image; the rendered pods' securityContext names it.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin keel
COPY --from=build /opt/keel /opt/keel
ENV PATH=/opt/keel/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/keel
WORKDIR /home/keel
USER 10001:10001
ENTRYPOINT ["python", "-m", "keel.launch.pod_entrypoint"]
