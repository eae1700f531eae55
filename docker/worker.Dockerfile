# The GPU worker image: the core plus the `train` extra (torch with its CUDA libraries from PyPI,
# litgpt, lightning, tokenizers). flash-attn is not in the lock file (PyPI has only an sdist that
# needs torch and nvcc to build): set --build-arg FLASH_ATTN=1 to build it here on a CUDA devel
# base; the engine uses it when it is importable and falls back to PyTorch's SDPA kernels.
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_BASE}

ARG FLASH_ATTN=0
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir --break-system-packages uv
WORKDIR /app
ENV UV_PROJECT_ENVIRONMENT=/app/.venv UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never \
    PYTHONUNBUFFERED=1 PATH=/app/.venv/bin:$PATH

COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --extra train --no-install-project
COPY cli ./cli
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini run_train.py ./
COPY configs ./configs
RUN uv sync --frozen --no-dev --extra train
# After the last `uv sync`: a sync removes every package the lock file does not list.
RUN if [ "$FLASH_ATTN" = "1" ]; then uv pip install --no-build-isolation flash-attn; fi

# One worker process per GPU slot: MOEJOBS_WORKER_GPUS narrows what this container uses.
CMD ["moejobs", "worker"]
