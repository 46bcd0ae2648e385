FROM python:3.11-slim
WORKDIR /app
COPY setup.cfg pyproject.toml README.md celeryconfig.py schema.sql ./
COPY pipeline pipeline
COPY api api
COPY tasks tasks
COPY providers providers
RUN pip install --no-cache-dir -e .
ENV PIPELINE_DATA_DIR=/var/lib/pipeline
