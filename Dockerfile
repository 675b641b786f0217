# The skinlesion image: every stage Job and the controller run `python /app/jobs/<job>.py`
# (charts/skinlesion renders the commands).
#
#   make image      # TF_VARIANT=cpu: CPU pools, kind   (skinlesion:<git sha>)
#   make image-gpu  # TF_VARIANT=gpu: GPU pools         (skinlesion:<git sha>-gpu)
#
# No registry is needed but the package indexes: the Makefile builds the base from Debian
# packages (`make base-image`, debootstrap + docker import) and passes it as PYTHON_IMAGE;
# any Debian-based Python 3.11 image works too (python:3.11-slim-bookworm). There is no
# `# syntax=` line on purpose: it makes BuildKit pull a frontend image from a registry.
#
# CPU variant: the tensorflow-cpu wheel of the pinned tensorflow version (the same code
# without the CUDA kernels: a smaller image). GPU variant: tensorflow[and-cuda] installs the
# CUDA and cuDNN libraries as pinned pip wheels (constraints.txt), so both variants share
# the same slim Python base; the nodes only need the NVIDIA driver and device plugin
# (nvidia.com/gpu), no CUDA base image.
#
# Dependencies are pinned by constraints.txt (the lock, generated from the tested .venv by
# `make lock`, checked by tests/test_chart.py). pip runs with its defaults (the package
# index); a CA bundle for a TLS-intercepting proxy comes in as the BuildKit secret `pipcert`
# (`make image PIP_CERT=path`), mounted for the RUN only, and pip's cache is a BuildKit
# cache mount: neither lands in a layer (tests/test_image.py greps the layers and the
# history). docker/slim-venv.sh then drops what only building needs (pip, C++ headers,
# libraries' test suites; in the CPU variant TensorFlow's symbol tables); the final stage
# holds only the virtualenv, skinlesion/, jobs/ and pyproject.toml, owned by root and run as
# the unprivileged uid 10001 (the chart's runAsUser) with a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: an empty virtualenv, and `strip` for docker/slim-venv.sh -----------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all: \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
WORKDIR /src

# --- requirements: the dependency list of pyproject.toml and of its optional extras but dev
# (mlflow: the client, off unless MLFLOW_TRACKING_URI is set), without the package and
# without tensorflow (the venv stage adds its variant's wheel of the pinned version). Its own
# stage, so that the install layers below are reused until the dependency list or the pins
# change (not on every edit of pyproject.toml).
FROM builder AS requirements
COPY constraints.txt pyproject.toml ./
RUN /opt/venv/bin/python -c "import re, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = p['dependencies'] + [r for k, v in p['optional-dependencies'].items() if k != 'dev' for r in v]; \
pins = dict(l.split('==') for l in open('constraints.txt').read().split() if '==' in l); \
print('\n'.join(d for d in deps if re.match(r'[\w.-]+', d)[0] != 'tensorflow')); \
open('tf-version', 'w').write(pins['tensorflow'])" > requirements.txt

# --- venv: the dependencies and the TensorFlow wheel of TF_VARIANT (make image: cpu,
# stripped of symbol tables; make image-gpu: gpu, tensorflow[and-cuda]) --------------------
FROM builder AS venv
ARG TF_VARIANT=cpu
COPY --from=requirements /src/requirements.txt /src/tf-version ./
COPY constraints.txt docker/slim-venv.sh ./
RUN --mount=type=secret,id=pipcert --mount=type=cache,target=/root/.cache/pip \
    case "$TF_VARIANT" in \
      cpu) tf=tensorflow-cpu; strip=--strip ;; \
      gpu) tf="tensorflow[and-cuda]"; strip= ;; \
      *) echo "TF_VARIANT must be cpu or gpu, not '$TF_VARIANT'" >&2; exit 2 ;; \
    esac \
 && { [ ! -s /run/secrets/pipcert ] || export PIP_CERT=/run/secrets/pipcert; } \
 && /opt/venv/bin/pip install -r requirements.txt -c constraints.txt "$tf==$(cat tf-version)" \
 && sh slim-venv.sh /opt/venv $strip

# --- runtime: slim Python, non-root user, application files only ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 skinlesion \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin skinlesion
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/tmp
WORKDIR /app

# --- app: the image ------------------------------------------------------------------------
FROM runtime AS app
COPY --from=venv /opt/venv /opt/venv
COPY pyproject.toml /app/
COPY skinlesion/ /app/skinlesion/
COPY jobs/ /app/jobs/
RUN /opt/venv/bin/python -m compileall -q /app/skinlesion /app/jobs \
 && /opt/venv/bin/python -c "import skinlesion.cli"
USER 10001:10001
CMD ["/opt/venv/bin/python", "-m", "skinlesion", "--help"]
