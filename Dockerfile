# Two stages: build the wheel from the source, then install that wheel (and its
# dependencies) into a clean image, so containers run what `pip install` of a release
# would, with no source tree beside it. tests/test_wheel.py checks that such an install
# works outside the checkout (`pipeline db upgrade`, `pipeline demo`).
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md celeryconfig.py ./
COPY pipeline pipeline
COPY api api
COPY tasks tasks
COPY providers providers
COPY service service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
# The `pipeline` command (db upgrade, worker, beat, secrets generate), gunicorn, and the
# api, tasks and celeryconfig modules compose.yaml names all come from this install.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
# No secrets in the image (and no .env: only the folders above are copied). SECRET_KEY
# and PROVIDER_KEY_SECRETS come from the environment at run time, the same values for
# every container (compose.yaml); on PostgreSQL a process without them refuses to start.
ENV PIPELINE_DATA_DIR=/var/lib/pipeline
