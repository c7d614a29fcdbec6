# The worker image of a Dask cluster on Kubernetes (docs/guides/workers.md#kubernetes): this project
# and its pinned runtime dependencies (pyproject.toml's, the runtime part of requirements.txt, dask
# and distributed among them), so that a `dask worker` in it can run the search's tasks.
#   docker build -t registry.example.com/cnn-search:latest . && docker push registry.example.com/cnn-search:latest
FROM python:3.11-slim
WORKDIR /opt/cnn-search
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY search_spaces search_spaces
RUN pip install --no-cache-dir . && python -m pipeline --help > /dev/null
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# KubeCluster sets the worker's command; alone the image runs one Dask worker of all its cores
CMD ["sh", "-c", "dask worker \"$DASK_SCHEDULER_ADDRESS\" --nthreads $(nproc) --resources cores=$(nproc)"]
