# syntax=docker/dockerfile:1
# One image for every role: SERVICE_ROLE picks it at run time (authentication, token, user-management).
#   docker build -t iam .
#   docker run --rm -e SERVICE_ROLE=token ... iam migrate     # one-shot: migrate the role's store
#   docker run -e SERVICE_ROLE=token ... iam                  # serve (the default command)
# No secrets in the image: client secrets and store URLs come from the environment, keys from a volume.

# -- build: a wheel for every dependency ----------------------------------------------------------------
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml ./
# Only the dependency list of pyproject.toml: this layer is rebuilt when dependencies change, not the code.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels -r requirements.txt

# -- runtime ------------------------------------------------------------------------------------------------
FROM python:3.11-slim

# The wheels are bind-mounted from the build stage, so they are in no layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --no-index /wheels/*.whl

# The code runs from /app, not from site-packages: iam/store.py finds the alembic trees next to the
# package (Path(iam.__file__).parent.parent / "migrations"), and config/iam.yaml is the default config
# relative to the working directory. Code and config are root-owned: the service cannot change them.
WORKDIR /app
COPY iam/ iam/
COPY migrations/ migrations/
COPY config/iam.yaml config/iam.yaml
# Byte-code compiled now, since the root filesystem is read-only at run time; /app/var is the one
# writable place (SQLite stores and generated keys, by default): mount a volume or an emptyDir there.
# /usr/local/bin/iam is the `iam` command, as after `pip install`.
RUN python -m compileall -q iam migrations \
 && mkdir -p var/keys && chown -R 10001:10001 var && chmod 0700 var/keys \
 && printf '#!/bin/sh\nexec python -m iam.cli "$@"\n' > /usr/local/bin/iam && chmod 0755 /usr/local/bin/iam

ENV PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IAM_HOST=0.0.0.0 \
    IAM_PORT=8080

USER 10001:10001
EXPOSE 8080
# Liveness only (no store check): the image has no curl, so Python asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health/live' % os.environ['IAM_PORT'], timeout=2)"]
ENTRYPOINT ["iam"]
CMD ["serve"]
