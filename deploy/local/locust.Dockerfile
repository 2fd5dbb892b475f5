# Stand-in for the official locustio/locust image (the compose `loadtest` profile), a venv
# with locust from PyPI, for machines that reach PyPI and a Debian mirror but no container
# registry (see docs/stack.md). LOCUST_VERSION follows the project's .venv (and
# LOCUST_IMAGE_TAG in docker-compose.yml).
#   docker build --network host --build-arg BASE_IMAGE=ctr-local/bookworm-python \
#       --build-arg LOCUST_VERSION=2.47.0 --secret id=pip_cert,src="$PIP_CERT" \
#       -f deploy/local/locust.Dockerfile -t ctr-local/locust:2.47.0 deploy/local
# The pip_cert secret (a CA bundle for pip behind a TLS-inspecting proxy) is optional.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG LOCUST_VERSION=2.47.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    VIRTUAL_ENV=/opt/locust \
    PATH=/opt/locust/bin:$PATH
# python3 + venv come with the debootstrap base; a plain Debian base gets them from apt
RUN if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    python3 -m venv /opt/locust \
    && cert="" \
    && if [ -s /run/secrets/pip_cert ]; then cert=/run/secrets/pip_cert; fi \
    && /opt/locust/bin/python -m pip install ${cert:+--cert "$cert"} "locust==${LOCUST_VERSION}" \
    && /opt/locust/bin/locust --version
# like the official image: user locust (uid 1000), locustfiles under /mnt/locust
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin locust
WORKDIR /mnt/locust
USER locust
EXPOSE 8089 5557
ENTRYPOINT ["locust"]
