# The image of the pipeline's own services (`pipeline migrate`, `topics create`, `run`,
# `simulate`, `control`), as compose.yaml runs them:
#
#   docker build -t agent-pipeline:local .
#   docker run --rm agent-pipeline:local --help
#
# Two stages: the first builds wheels of the package and of every dependency from this source
# tree; the second installs only those wheels into a slim Python, without pip or a compiler,
# and runs as an unprivileged user. The entrypoint is the `pipeline` command.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# What the package is built from, and nothing else (.dockerignore keeps the rest out too).
COPY pyproject.toml README.md ./
COPY sql sql
COPY pipeline pipeline
COPY producers producers
COPY consumers consumers
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# The user owns the directories the control keys' volumes are mounted on: a fresh named
# volume takes the owner and mode of the directory it is first mounted on.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/pipeline --create-home \
        --shell /usr/sbin/nologin pipeline \
    && install -d -o pipeline -g pipeline -m 0700 /var/lib/pipeline/keys/private \
    && install -d -o pipeline -g pipeline -m 0755 /var/lib/pipeline/keys/public
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels agent-pipeline \
    && pip uninstall --yes pip setuptools wheel
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/pipeline
ENTRYPOINT ["pipeline"]
CMD ["--help"]
