# syntax=docker/dockerfile:1
# One image for the four services; the command picks one: python -m pricewire_<service>.
# Build: docker build -t pricewire:local .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with pricewire and its dependencies, compiled where wheels are missing ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/pricewire
WORKDIR /src
# Dependencies first, from pyproject alone, so a change of source reuses this layer.
COPY pyproject.toml README.md ./
RUN /opt/pricewire/bin/pip install --upgrade pip \
 && /opt/pricewire/bin/python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/pricewire/bin/pip install -r /tmp/requirements.txt
COPY libs ./libs
COPY services ./services
# A regular (not editable) install: the runtime stage gets no source tree and no build tools.
RUN /opt/pricewire/bin/pip install --no-deps . \
 && /opt/pricewire/bin/python -c "import pricewire_collector, pricewire_validator, pricewire_cache_writer, pricewire_gateway"

# --- runtime: the virtualenv only, run by an unprivileged user ---
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 pricewire \
 && useradd --system --uid 10001 --gid pricewire --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pricewire
COPY --from=build /opt/pricewire /opt/pricewire
ENV PATH=/opt/pricewire/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PRICEWIRE_LOG_FORMAT=json \
    PRICEWIRE_METRICS_PORT=9100
# A numeric user, so Kubernetes can check runAsNonRoot without resolving names.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 9100
# The gateway by default; the other services override the command (see docker-compose.yml, deploy/k8s).
CMD ["python", "-m", "pricewire_gateway"]
