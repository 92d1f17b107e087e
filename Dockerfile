# The control plane's image (API, worker and beat share it; compose.yaml picks the command).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 UV_PROJECT_ENVIRONMENT=/opt/venv PATH=/opt/venv/bin:$PATH
# busybox-static: `manage.py build_agent_image` puts its binary in the workspace agent image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends busybox-static \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir uv
WORKDIR /app
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-group apps --no-install-project
COPY . .
RUN DJANGO_SETTINGS_MODULE=project.settings python manage.py collectstatic --noinput --verbosity 0
EXPOSE 8000
CMD ["gunicorn", "project.asgi:application", "--worker-class", "uvicorn_worker.UvicornWorker", "--bind", "0.0.0.0:8000", "--workers", "2"]
