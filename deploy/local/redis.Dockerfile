# Stand-in for the official redis:7 image, built from Debian's redis-server package, for
# machines that reach a Debian mirror but no container registry (see docs/stack.md).
#   docker build --network host --build-arg BASE_IMAGE=ctr-local/bookworm-python \
#       -f deploy/local/redis.Dockerfile -t ctr-local/redis:7 deploy/local
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
# like the official image: no config file, so protected mode must be turned off by the
# command line when clients come from elsewhere (the compose files do that)
CMD ["redis-server"]
