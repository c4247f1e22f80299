# lapi-kv-sync: the script on a stock Python, nothing installed (it needs only the standard library).
# Build:  docker build --build-arg VERSION="$(python3 lapi_kv_sync.py --version | cut -d' ' -f2)" -t <registry>/lapi-kv-sync:<that version> .
# For reproducible builds pin the base by digest, e.g.
#   FROM python:3.12-alpine@sha256:<digest>   (docker buildx imagetools inspect python:3.12-alpine)
# and let Renovate or Dependabot move the digest, so security fixes to Alpine and Python still land.
FROM python:3.12-alpine

# The version lives in lapi_kv_sync.py (__version__) alone; the build passes it in for the label.
ARG VERSION=unknown
LABEL org.opencontainers.image.title="lapi-kv-sync" \
      org.opencontainers.image.description="Keeps a Cloudflare Workers KV namespace equal to CrowdSec LAPI's bans and captchas" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12-alpine"

COPY --chown=0:0 --chmod=0444 lapi_kv_sync.py /app/lapi_kv_sync.py

# A batch job: it runs once and exits, so there is nothing for a health check to probe.
HEALTHCHECK NONE

USER 65532:65532
ENTRYPOINT ["python3", "-I", "/app/lapi_kv_sync.py"]
