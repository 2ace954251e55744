# syntax=docker/dockerfile:1
# The pagedserve server image, in two variants chosen by a build argument:
#   docker build -t pagedserve:0.1.0-cpu .                              # CPU torch, no CUDA wheels
#   docker build --build-arg VARIANT=cuda -t pagedserve:0.1.0-cuda .    # CUDA torch
# Run: docker run -p 8000:8000 pagedserve:0.1.0-cpu serve --host 0.0.0.0  (the bundled model)
# Deployment on Kubernetes: deploy/kubernetes/ and docs/deploy.md.
ARG VARIANT=cpu
ARG PYTHON_VERSION=3.12
ARG TORCH_VERSION=2.13.0

FROM python:${PYTHON_VERSION}-slim AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# torch first (with numpy, without which it warns on import), from an index that has the build
# wanted: PyTorch's CPU index holds CPU-only wheels, so nothing pulls the CUDA libraries (several
# GB) into this variant.
FROM base AS torch-cpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" numpy

# PyPI's Linux torch is the CUDA build; its wheels bring the CUDA runtime libraries (the node
# brings the driver). Another CUDA version: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ.
# Triton (a dependency of CUDA torch) compiles its launcher with a C compiler when it first
# runs a kernel.
FROM base AS torch-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" numpy

FROM torch-${VARIANT} AS image
# As the Makefile does: pin the torch just installed, so that no dependency can replace it
# with another build.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /opt/venv/constraints.txt
COPY pyproject.toml README.md /src/
COPY pagedserve /src/pagedserve
RUN pip install -c /opt/venv/constraints.txt "/src[server]" \
    && rm -rf /src \
    && useradd --uid 1000 --create-home pagedserve
USER 1000
WORKDIR /home/pagedserve
EXPOSE 8000
ENTRYPOINT ["pagedserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
