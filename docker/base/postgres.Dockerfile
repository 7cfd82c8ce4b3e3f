# A stand-in for the official postgres image, made from Debian's own packages, for hosts
# that cannot pull from a public image registry (docker/make-base-images builds it).
# Debian bookworm ships PostgreSQL 15; MLflow's schema runs on it as on 16.
# docker-entrypoint.sh honours the official image's variables (POSTGRES_USER,
# POSTGRES_PASSWORD, POSTGRES_DB, PGDATA), so docker/compose.yaml runs either unchanged.
ARG DEBIAN_IMAGE=r2sweep-local/debian:bookworm
FROM ${DEBIAN_IMAGE}

ENV LANG=C.UTF-8 PGDATA=/var/lib/postgresql/data
# No default cluster: the entrypoint creates one in PGDATA (a volume) on first start.
RUN mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/lib/postgresql/*/bin/* /usr/local/bin/ \
    && mkdir -p "$PGDATA" /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
