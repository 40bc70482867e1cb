# retrain and retrain-server in a small Debian image.
#
#   docker build -t retrain .            # or: podman build --format docker -t retrain .
#                                        #     (podman's default OCI format drops HEALTHCHECK)
#   docker run -d -p 8080:8080 -e RETRAIN_SERVER_TOKEN=... -v "$PWD:/work" retrain
#                                        # retrain-server on /work/retrain.toml (HEALTHCHECK: /healthz)
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" retrain retrain run --config retrain.toml
#
# The runtime image has no Python: a config whose commands need it should
# extend this image (FROM retrain + apt-get install python3). See
# docs/BENCHMARKS.md ("Container") for how this file is checked.

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir between builds (BuildKit,
# podman/buildah); the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p retrain-cli -p retrain-server \
    && install -D -m 0755 -t /out target/release/retrain target/release/retrain-server

FROM ${RUNTIME_IMAGE}
# ca-certificates: HTTPS to the Hub, MLflow, S3, EC2, GitHub. Unpinned on
# purpose: the point is to get bookworm's security updates at build time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /work retrain
COPY --from=build /out/retrain /out/retrain-server /usr/local/bin/
USER 10001:10001
WORKDIR /work
# The server listens on every interface inside the container (its default
# is loopback); the health check asks it there.
ENV RETRAIN_SERVER__BIND=0.0.0.0:8080 RETRAIN_SERVER_ADDR=0.0.0.0:8080
EXPOSE 8080
# No curl in a slim image: the server binary checks itself (exit 0 on a 200).
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["retrain-server", "--healthcheck"]
CMD ["retrain-server"]
