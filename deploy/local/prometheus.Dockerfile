# Stand-in for the official prom/prometheus image, built from Debian's prometheus package,
# for machines that reach a Debian mirror but no container registry (see docs/stack.md).
#   docker build --network host --build-arg BASE_IMAGE=ctr-local/bookworm-python \
#       -f deploy/local/prometheus.Dockerfile -t ctr-local/prometheus:2 deploy/local
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /etc/prometheus /prometheus \
    && chown prometheus:prometheus /prometheus
WORKDIR /prometheus
USER prometheus
EXPOSE 9090
# the same entrypoint and default flags as prom/prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
