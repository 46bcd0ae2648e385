FROM python:3.11-slim
WORKDIR /app
COPY setup.cfg pyproject.toml README.md celeryconfig.py schema.sql ./
COPY pipeline pipeline
COPY api api
COPY tasks tasks
COPY providers providers
# The `pipeline` command (db init, worker, beat, secrets generate) lives here.
COPY service service
RUN pip install --no-cache-dir -e .
# No secrets in the image (and no .env: only the folders above are copied). SECRET_KEY
# and PROVIDER_KEY_SECRETS come from the environment at run time, the same values for
# every container (compose.yaml); on PostgreSQL a process without them refuses to start.
ENV PIPELINE_DATA_DIR=/var/lib/pipeline
