# The one image both services of compose.yaml run: the project and SoftHSM2 on Debian 12
# (its python3 is 3.11). Nothing is configured here: `dev up` writes the configs, the
# certificates and the tokens into the shared /stack volume when a container starts.
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv softhsm2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY ekm_sim ekm_sim
COPY kms_proxy kms_proxy
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
