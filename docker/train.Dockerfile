# syntax=docker/dockerfile:1
# Keel's training image (CUDA). Its entrypoint runs `torchrun -m trainer RECIPE [key=value ...]`
# with launcher options taken from the Kubeflow PyTorchJob environment
# (keel/launch/pod_entrypoint.py), so the same image runs as Master, as Worker and under elastic
# rendezvous. Build from the repository root:
#   docker build -f docker/train.Dockerfile -t keel-train:0.1.0 .
#   docker build -f docker/train.Dockerfile --build-arg FLASH_ATTN=1 -t keel-train:0.1.0-fa .
# PyPI's torch 2.13.0 is built for CUDA 13.0 and brings its CUDA libraries as wheels; the
# devel base supplies nvcc for flash-attention. NVIDIA driver 580 or newer on the nodes.
# DeepSpeed ops that compile at run time need nvcc too: add
# --build-arg CUDA_RUNTIME=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04 (a larger image).
ARG CUDA_DEVEL=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
ARG CUDA_RUNTIME=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_DEVEL} AS build
ARG FLASH_ATTN=0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's archive keeps only the newest build of a package in -updates, so an exact apt pin
# breaks the build at the next security update; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-dev python3.12-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/keel
ENV PATH=/opt/keel/bin:$PATH
COPY docker/requirements/train-cuda.txt /tmp/requirements.txt
RUN pip install pip==26.3 \
 && pip install -r /tmp/requirements.txt
# flash-attention compiles against this torch (no prebuilt wheel matches it): an hour or more.
RUN if [ "$FLASH_ATTN" = "1" ]; then MAX_JOBS=8 pip install --no-build-isolation flash-attn==2.8.3.post2; fi
COPY pyproject.toml README.md /src/
COPY data /src/data
COPY trainer /src/trainer
COPY keel /src/keel
COPY serving /src/serving
RUN pip install --no-deps /src \
 && pip check \
 && python -c "import keel.launch.pod_entrypoint, trainer.train"

FROM ${CUDA_RUNTIME}
ENV DEBIAN_FRONTEND=noninteractive
# Same reason as above for the unpinned apt package. The base image's `ubuntu` user holds uid
# 1000; Keel's user is 10001 in every image, which the rendered pods' securityContext names.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin keel
COPY --from=build /opt/keel /opt/keel
ENV PATH=/opt/keel/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/keel
WORKDIR /home/keel
USER 10001:10001
ENTRYPOINT ["python", "-m", "keel.launch.pod_entrypoint"]
