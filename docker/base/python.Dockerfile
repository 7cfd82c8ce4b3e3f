# A stand-in for the official python:3.11-slim-bookworm image, made from Debian's own
# packages, for hosts that cannot pull from a public image registry (docker/make-base-images
# builds it on the Debian root file system it imports). Debian bookworm's Python is 3.11,
# the release the official image pins; ca-certificates as there (an extra CA is a build
# secret of the r2sweep image, never part of this one).
ARG DEBIAN_IMAGE=r2sweep-local/debian:bookworm
FROM ${DEBIAN_IMAGE}

ENV LANG=C.UTF-8
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python

CMD ["python3"]
