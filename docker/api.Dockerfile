# The API image: the torch-free core only (FastAPI, SQLModel, Alembic, Celery client).
FROM python:3.11-slim

RUN pip install --no-cache-dir uv
WORKDIR /app
ENV UV_PROJECT_ENVIRONMENT=/app/.venv UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy PYTHONUNBUFFERED=1

# Dependencies first (cached layer), then the project itself.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY cli ./cli
COPY service ./service
COPY worker ./worker
COPY run_train.py ./
COPY migrations ./migrations
COPY alembic.ini ./
COPY configs ./configs
RUN uv sync --frozen --no-dev

ENV MOEJOBS_HOST=0.0.0.0 MOEJOBS_PORT=8000 PATH=/app/.venv/bin:$PATH
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
CMD ["moejobs", "serve"]
