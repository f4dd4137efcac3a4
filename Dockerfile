# syntax=docker/dockerfile:1
# mtx: one small, non-root image with the `mtx` binary (every worker pool is
# `mtx run <pool>`, plus `mtx topology apply`, `mtx db migrate`, ...).
#
#   docker build -t ghcr.io/mathematricks/mtx:$(git describe --always) .
#
# Stage 1 builds a release binary with the workspace's locked dependencies;
# stage 2 is distroless `cc` (glibc, libgcc, CA certificates, tzdata; no shell,
# no package manager) running as uid/gid 65532. TLS is rustls (no OpenSSL).

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit caches keep the registry and target dir between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mtx \
 && install -D -m 0755 target/release/mtx /out/mtx

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="mtx" \
      org.opencontainers.image.description="Mathematricks trading pipeline: gateway, standardizer, cerebro, execution, accounts, sink" \
      org.opencontainers.image.licenses="UNLICENSED"
COPY --from=build /out/mtx /usr/local/bin/mtx
# In a container the ops and gateway listeners must not be loopback-only.
ENV MTX_METRICS__ADDR=0.0.0.0:9464 \
    MTX_GATEWAY__ADDR=0.0.0.0:8080 \
    MTX_LOG__FORMAT=json
USER 65532:65532
EXPOSE 8080 9464
ENTRYPOINT ["/usr/local/bin/mtx"]
CMD ["run", "all"]
