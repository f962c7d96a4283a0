# syntax=docker/dockerfile:1
# UniCharacter bots. The default target is the CPU image (frontends, migrations, sweeper, CPU workers);
# `--target gpu` builds the CUDA image for the GPU workers, with the `gpu` extra (flash-attn).
#
#   docker build -t unichar:cpu .
#   docker build -t unichar:gpu --target gpu .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

# ---- GPU workers: CUDA toolkit (flash-attn compiles against it), torch's CUDA build from PyPI ----------------
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH UNICHAR_DATA_DIR=/data MAX_JOBS=4
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 unichar \
    && mkdir -p /data && chown unichar /data
WORKDIR /app
RUN pip install torch==2.13.0 packaging ninja wheel
COPY --chown=unichar . .
RUN pip install --no-build-isolation -e '.[gpu]'
USER unichar
VOLUME ["/data"]
CMD ["unichar", "worker", "--queues", "chat,image"]

# ---- CPU image (default): torch's CPU build ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 UNICHAR_DATA_DIR=/data
RUN useradd --create-home --uid 10001 unichar && mkdir -p /data && chown unichar /data
WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY --chown=unichar . .
RUN pip install -e .
USER unichar
VOLUME ["/data"]
CMD ["unichar", "run"]
