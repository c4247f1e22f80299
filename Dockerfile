# lapi-kv-sync: the script on a stock Python, nothing installed (it needs only the standard library).
FROM python:3.12-alpine

LABEL org.opencontainers.image.title="lapi-kv-sync" \
      org.opencontainers.image.description="Keeps a Cloudflare Workers KV namespace equal to CrowdSec LAPI's bans and captchas" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12-alpine"

COPY --chown=0:0 --chmod=0444 lapi_kv_sync.py /app/lapi_kv_sync.py

# A batch job: it runs once and exits, so there is nothing for a health check to probe.
HEALTHCHECK NONE

USER 65532:65532
ENTRYPOINT ["python3", "-I", "/app/lapi_kv_sync.py"]
