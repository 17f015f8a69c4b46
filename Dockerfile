# The kubetune operator image: kopf reconciling FineTuneJobs (no torch, no trainer dependencies).
#   docker build -t ghcr.io/kubetune/operator:0.1.0 .
# The Helm chart runs the same command with --namespace flags when it watches a list of namespaces.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubetune/ kubetune/
COPY examples/ examples/
COPY operator/ operator/
COPY trainer_image/kubetune_trainer/ trainer_image/kubetune_trainer/
# The project itself, from this checkout; its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[operator]" \
    && python -c "import kubetune_operator.render" \
    && rm -rf /src

# Non-root, numeric so the kubelet can check runAsNonRoot (the chart runs it as 10001 too).
RUN groupadd --gid 10001 kubetune \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kubetune
USER 10001:10001
WORKDIR /tmp

# 8080: kopf liveness (/healthz); 9090: Prometheus metrics.
EXPOSE 8080 9090
CMD ["kopf", "run", "--standalone", "--module=kubetune_operator.handlers", "--liveness=http://0.0.0.0:8080/healthz", "--all-namespaces"]
