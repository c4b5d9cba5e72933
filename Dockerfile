# syntax=docker/dockerfile:1
# carousel's container images.
#
#   runtime (the default target): serves a model repository with onnxruntime.
#     No torch, no onnx, no compilers; runs as an unprivileged user.
#       docker build -t carousel .
#       docker run --rm -p 127.0.0.1:8000:8000 -e CAROUSEL_API_KEYS=me:$(openssl rand -hex 16) carousel
#   train: trains and exports models (torch 2.13.0, CPU); see the README.
#       docker build --target train -t carousel-train .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ----------------------------------------------------------------- base: shared by all stages
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A fixed uid and gid (10001): a mounted folder's permissions can be granted to it from
# the host, and USER is numeric, so a runtime can verify it is not root.
RUN groupadd --system --gid 10001 carousel \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin carousel

# ------------------------------------------- source: the project as pip installs it, listed once
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY carousel/ /src/carousel/
COPY model/ /src/model/
COPY export/ /src/export/
COPY service/ /src/service/
COPY bench/ /src/bench/

# -------------------------------------------- build: the serving virtualenv, copied whole below
FROM base AS build
RUN python -m venv /opt/venv
# Dependencies first, from the lock alone: editing the source reuses this layer.
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
RUN pip install --requirement /tmp/requirements-serve.txt
COPY --from=source /src /src
# --no-deps: everything is in the lock already; `pip check` fails the build if the lock
# no longer satisfies pyproject.toml. The runtime installs nothing, so the venv's own pip
# and setuptools (26 MB) stay behind.
RUN pip install --no-deps /src && pip check \
    && pip uninstall --yes pip setuptools

# ----------------------------------------------------- train: retrain and export in a container
FROM base AS train
# Optional: a package index for a CPU-only torch wheel (PyPI's Linux wheel pulls CUDA
# libraries, several GB). Empty: PyPI.
ARG TORCH_INDEX_URL=""
# torch first and pinned: the train extra's range is then already satisfied, so pip pulls
# no other torch build. (DL3013 takes the optional --index-url expansion for an unpinned
# package; the one package here is pinned.)
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && pip install ${TORCH_INDEX_URL:+--index-url=$TORCH_INDEX_URL} torch==2.13.0
# Then the train extra's dependencies, the serving ones at the image's locked versions.
COPY pyproject.toml deploy/requirements.py deploy/requirements-serve.txt /tmp/
RUN python /tmp/requirements.py /tmp/pyproject.toml train > /tmp/requirements-train.txt \
    && pip install --requirement /tmp/requirements-train.txt \
        --constraint /tmp/requirements-serve.txt
COPY --from=source /src /src
RUN pip install --no-deps /src && pip check
# Runs and exported models are written under /workspace: mount runs/ and models/ there.
WORKDIR /workspace
RUN chown 10001:10001 /workspace
ENV MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
ENTRYPOINT ["carousel"]
CMD ["train", "--help"]

# ---------------------------------------------- runtime: the serving image (the default target)
FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
# The bundled model repository; mount another over /models to serve your own.
COPY models/ /models/
COPY deploy/healthcheck.py /opt/carousel/healthcheck.py
# Every setting comes from the environment (CAROUSEL_*, see the README). These three are
# the image's layout: listen on every interface of the container, read /models.
# On 0.0.0.0 `carousel serve` refuses to start (exit status 2, with a message) unless API
# keys are configured, -e CAROUSEL_API_KEYS_FILE=/path/in/container/keys.toml (mount it) or
# -e CAROUSEL_API_KEYS=tenant:KEY, or unauthenticated serving is asked for explicitly with
# -e CAROUSEL_ALLOW_UNAUTHENTICATED=true (see docs/SECURITY.md).
ENV CAROUSEL_HOST=0.0.0.0 \
    CAROUSEL_PORT=8000 \
    CAROUSEL_MODEL_REPOSITORY=/models
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/carousel/healthcheck.py"]
ENTRYPOINT ["carousel"]
CMD ["serve"]
