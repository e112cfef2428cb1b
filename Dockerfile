# One image for the control plane (`fourfold up`) and every Ray node, head and workers: they must run
# the same Python, torch and Ray, so they are built once. The role is chosen by the command
# (docker-compose.yml, deploy/k8s/).
#
#   docker build -t fourfold:0.1.0 .                                          # CPU torch
#   docker build --build-arg TORCH_BUILD=cu128 -t fourfold:0.1.0-cu128 .      # torch for CUDA 12.8
#
# Ray's version is not chosen here: it is the exact pin of pyproject.toml (`ray==...`), installed from
# pyproject's own dependency list, so the image, the RayCluster's rayVersion and a local `make setup`
# agree. No secret is baked in: tokens, the database URL and Ray's auth token come from the
# environment at run time (docs/deploy.md).

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# Which torch build: `cpu`, or a CUDA tag of PyTorch's wheel index (cu126, cu128, ...). The version
# is the one `make setup` installs, inside pyproject's range.
ARG TORCH_BUILD=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_BUILD}

# No virtual environment: KubeRay starts Ray through `bash -l`, whose /etc/profile resets PATH to the
# system directories, so `ray` and `fourfold` live in /usr/local/bin, where the base image's Python is.
# RAY_USAGE_STATS_ENABLED=0: Ray does not try to report usage from inside a cluster.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    RAY_USAGE_STATS_ENABLED=0 \
    FOURFOLD_DATA_DIR=/var/lib/fourfold

# wget only: KubeRay's default readiness and liveness probes of Ray pods call it. Debian's security
# updates replace exact versions, so it is not pinned (the base image's tag is).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the index of the chosen build; pyproject's `torch>=...` is then already met.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/fourfold

# The dependencies before the code, so that a code change reuses this layer: pyproject's own list
# plus the `cluster` extra (Ray's dashboard and metrics agent at the same pinned version, s3fs).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['cluster']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY parallel/ parallel/
COPY workers/ workers/
COPY service/ service/
COPY api/ api/
COPY examples/ examples/
RUN pip install --no-cache-dir --no-deps .

# A non-root user (uid 1000, as KubeRay's examples assume). The directories that volumes are mounted
# on are created here and owned by it, so that a fresh Docker volume starts writable: the store's
# data directory, the checkpoints every node shares, and Ray's session directory (/tmp/ray), which
# the control plane shares with the head it drives.
RUN groupadd --gid 1000 fourfold \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash fourfold \
    && mkdir -p /var/lib/fourfold /checkpoints /tmp/ray \
    && chown fourfold:fourfold /var/lib/fourfold /checkpoints /tmp/ray
# Numeric, so that Kubernetes' runAsNonRoot can tell it is not root.
USER 1000:1000

# 8000: the API, dashboard and /metrics; 6379: Ray's GCS; 8265: Ray's dashboard; 10001: Ray client;
# 8080: Ray's metrics (--metrics-export-port).
EXPOSE 8000 6379 8265 10001 8080

# The control plane on 127.0.0.1 (it refuses another host without FOURFOLD_TOKENS); compose and
# Kubernetes give each role its own command.
CMD ["fourfold", "up"]
