# The inference worker: CPU-only torch, non-root user, models baked in.
#   docker build -t kafka-inference-worker .
# For NVIDIA GPUs, torch with CUDA (PyPI's default Linux build, or a CUDA index of PyTorch's):
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t kafka-inference-worker:gpu .
#   docker run --rm -e WORKER_KAFKA__BOOTSTRAP_SERVERS=broker:9092 kafka-inference-worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# PyPI's Linux torch wheel bundles CUDA (several GB); the CPU build comes from PyTorch's own
# index. Override the build argument to use a mirror, or PyPI's default build for GPU hosts
# (the Compose profile "gpu" and deploy/k8s/gpu do).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY worker ./worker
RUN pip install . && useradd --system --uid 10001 --no-create-home worker
COPY models ./models

USER 10001
ENV WORKER_MODELS__REPOSITORY=/app/models \
    WORKER_LOG__FORMAT=json
ENTRYPOINT ["python", "-m", "worker"]
CMD ["serve"]
