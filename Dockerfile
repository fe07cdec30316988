# syntax=docker/dockerfile:1
# The two images, each one static binary (musl) on distroless/static, run as the distroless
# `nonroot` user (65532). Build from the repository root, choosing the image with --target:
#
#   docker build --target cairn          -t REGISTRY/cairn:0.1.0 .
#   docker build --target cairn-operator -t REGISTRY/cairn-operator:0.1.0 .
#   (multi-arch: docker buildx build --platform linux/amd64,linux/arm64 --target ... --push .)
#
# - `cairn`: the store. It carries the whole `cairn` command, so the same image serves the
#   store, `cairn snapshot save/restore/status` (backup Jobs, restore init containers) and
#   `cairn bench`. The operator runs it with `command: ["cairn"]` and the data volume at
#   /var/lib/cairn (its pods get fsGroup 65532, so the volume is writable).
# - `cairn-operator`: the operator; it reads nothing from its file system but the
#   ServiceAccount mount, so it runs with a read-only root file system.
#
# Each platform compiles natively (under emulation for a foreign one): the Rust target is
# the builder's own architecture with musl. The protos compile with protox (pure Rust) and
# raft-proto uses the protoc it bundles: no system protoc is needed.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS toolchain
# musl-tools: ring's C parts (rustls) compile with musl-gcc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .

# One --locked release build per binary, into /out/<binary>.
FROM toolchain AS build-cairn
RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target \
    t="$(uname -m)-unknown-linux-musl" && cargo build --release --locked -p cairn --bin cairn --target "$t" \
 && install -D -m 0755 "target/$t/release/cairn" /out/cairn

FROM toolchain AS build-cairn-operator
RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target \
    t="$(uname -m)-unknown-linux-musl" && cargo build --release --locked -p cairn-operator --bin cairn-operator --target "$t" \
 && install -D -m 0755 "target/$t/release/cairn-operator" /out/cairn-operator

FROM gcr.io/distroless/static-debian12:nonroot AS cairn-operator
COPY --from=build-cairn-operator /out/cairn-operator /usr/local/bin/cairn-operator
USER 65532:65532
# /metrics, /healthz, /readyz.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cairn-operator"]

# Last, so that a plain `docker build .` gives the store image.
FROM gcr.io/distroless/static-debian12:nonroot AS cairn
COPY --from=build-cairn /out/cairn /usr/local/bin/cairn
USER 65532:65532
# Client (gRPC, HTTP/JSON gateway, /metrics, /readyz, /livez) and peer ports.
EXPOSE 2379 2380
ENTRYPOINT ["/usr/local/bin/cairn"]
