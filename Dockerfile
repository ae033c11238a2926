# Telemetra server image. Build: docker build -t telemetra .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
# pg_dump/pg_restore for `telemetra backup`/`restore` on PostgreSQL.
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/backup.sh /usr/local/bin/telemetra-backup
RUN useradd --system --uid 10001 --home /data telemetra && mkdir -p /data && chown telemetra /data
COPY --from=build /install /usr/local
USER telemetra
WORKDIR /data
ENV TELEMETRA_DATA_DIR=/data TELEMETRA_HOST=0.0.0.0 TELEMETRA_PORT=8000
EXPOSE 8000 1883 8883
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status==200 else 1)"
ENTRYPOINT ["telemetra"]
CMD ["serve"]
