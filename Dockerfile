# syntax=docker/dockerfile:1

# --- build stage: dependencies into a virtualenv that the final stage copies whole ---
FROM python:3.12.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY requirements.txt /tmp/requirements.txt
# The lock pins every package with its hashes; pip then leaves the virtualenv, which needs no
# installer at run time.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r /tmp/requirements.txt \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools wheel

# --- runtime stage: the interpreter, the virtualenv and the service's own files only ---
FROM python:3.12.12-slim-bookworm
LABEL org.opencontainers.image.title="documents-service" \
      org.opencontainers.image.description="Documents API: FastAPI over a durable embedded SQLite store" \
      org.opencontainers.image.version="1.0.0" \
      org.opencontainers.image.licenses="MIT"

# A fixed uid/gid, so a host directory can be prepared for the volume (chown 10001:10001).
# The base's own pip goes too: nothing installs anything into the running image.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app/data && chown app:app /app/data \
    && if python -m pip --version >/dev/null 2>&1; then \
        python -m pip uninstall --yes --quiet pip setuptools wheel; fi

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/app/data

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Code stays owned by root: the service cannot modify itself.
# Every service module: .dockerignore admits *.py at the top level and keeps the tests out.
COPY *.py ./
COPY data/sample_documents.json ./samples/

USER 10001:10001
VOLUME /app/data
EXPOSE 8000

# Slim has no curl: ask /health with the standard library.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=2)"]

# Exec form: SIGTERM from `docker stop` reaches the server, which drains and closes the store.
CMD ["python", "main.py"]
