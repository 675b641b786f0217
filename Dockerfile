# syntax=docker/dockerfile:1
# The skinlesion image: every stage Job and the controller run `python /app/jobs/<job>.py`
# (charts/skinlesion renders the commands).
#
#   docker build --target cpu -t skinlesion:dev .   # CPU pools, kind (make image)
#   docker build --target gpu -t skinlesion:dev-gpu .  # GPU pools (make image-gpu)
#
# GPU target: tensorflow[and-cuda] installs the CUDA and cuDNN libraries as pinned pip
# wheels (constraints.txt), so both targets share the same slim Python base; the nodes
# only need the NVIDIA driver and device plugin (nvidia.com/gpu), no CUDA base image.
#
# Dependencies are pinned by constraints.txt (generated from the tested .venv:
# `python -m tests.chart_render`, checked by tests/test_chart.py). The runtime stages hold
# only the virtualenv, skinlesion/, jobs/ and pyproject.toml, owned by root and run as the
# unprivileged uid 10001 (the chart's runAsUser) with a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: wheels and a virtualenv of the pinned dependencies ---------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY constraints.txt pyproject.toml ./
# The dependency list of pyproject.toml, without the package (so that this layer is reused
# until the dependencies change), built into wheels and installed into /opt/venv.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --wheel-dir /wheels -r requirements.txt -c constraints.txt \
 && /opt/venv/bin/pip install --no-index --find-links /wheels -r requirements.txt -c constraints.txt

# --- builder-gpu: the same plus the CUDA libraries of tensorflow[and-cuda] ------------------
FROM builder AS builder-gpu
RUN TF="$(/opt/venv/bin/python -c 'from importlib.metadata import version; print(version("tensorflow"))')" \
 && /opt/venv/bin/pip install -c constraints.txt "tensorflow[and-cuda]==${TF}"

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

# --- gpu ------------------------------------------------------------------------------------
FROM runtime AS gpu
COPY --from=builder-gpu /opt/venv /opt/venv
COPY pyproject.toml /app/
COPY skinlesion/ /app/skinlesion/
COPY jobs/ /app/jobs/
RUN python -m compileall -q /app/skinlesion /app/jobs \
 && python -c "import skinlesion.cli"
USER 10001:10001
CMD ["python", "-m", "skinlesion", "--help"]

# --- cpu (the default target: last) --------------------------------------------------------
FROM runtime AS cpu
COPY --from=builder /opt/venv /opt/venv
COPY pyproject.toml /app/
COPY skinlesion/ /app/skinlesion/
COPY jobs/ /app/jobs/
RUN python -m compileall -q /app/skinlesion /app/jobs \
 && python -c "import skinlesion.cli"
USER 10001:10001
CMD ["python", "-m", "skinlesion", "--help"]
