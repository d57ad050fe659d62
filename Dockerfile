# syntax=docker/dockerfile:1
# One image for every role: `docker run sluice:local <role>` (see compose.yaml).
# Build stage: the toolchain pinned by rust-toolchain.toml, with cargo's registry and the
# target dir in BuildKit caches so a code change does not rebuild every dependency.
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice \
    && cp target/release/sluice /usr/local/bin/sluice

# Runtime: Debian slim with CA roots (TLS to providers uses rustls) and nothing else; the
# binary runs as an unprivileged user with no shell login and no writable system paths.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/sluice --create-home \
       --shell /usr/sbin/nologin sluice
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
USER 10001:10001
WORKDIR /var/lib/sluice
# API (ingress) and /healthz + /metrics of the other roles (SLUICE_METRICS_LISTEN).
EXPOSE 8080 9100
# Checks whichever of SLUICE_METRICS_LISTEN or SLUICE_LISTEN the role serves.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["sluice", "healthcheck"]
ENTRYPOINT ["sluice"]
CMD ["--help"]
