# syntax=docker/dockerfile:1
# The two images, each one release binary on distroless (`cc`: glibc and libgcc, no shell, no
# package manager), run as the distroless `nonroot` user (65532). Build from the repository
# root, choosing the image with --target:
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
# Why glibc and not a static musl binary: musl's allocator serialises a multi-threaded
# server's allocations, which a store under load would feel; the builder (Debian 12) and the
# runtime (distroless Debian 12) share glibc 2.36. Each platform compiles natively (under
# emulation for a foreign one). The protos compile with protox (pure Rust) and raft-proto
# uses the protoc it bundles: no system protoc is needed.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS source
WORKDIR /src
COPY . .

# One --locked release build per binary, into /out/<binary>.
FROM source AS build-cairn
RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cairn --bin cairn \
 && install -D -m 0755 target/release/cairn /out/cairn

FROM source AS build-cairn-operator
RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cairn-operator --bin cairn-operator \
 && install -D -m 0755 target/release/cairn-operator /out/cairn-operator

FROM gcr.io/distroless/cc-debian12:nonroot AS cairn-operator
COPY --from=build-cairn-operator /out/cairn-operator /usr/local/bin/cairn-operator
USER 65532:65532
# /metrics, /healthz, /readyz.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cairn-operator"]

# Last, so that a plain `docker build .` gives the store image.
FROM gcr.io/distroless/cc-debian12:nonroot AS cairn
COPY --from=build-cairn /out/cairn /usr/local/bin/cairn
USER 65532:65532
# Client (gRPC, HTTP/JSON gateway, /metrics, /readyz, /livez) and peer ports.
EXPOSE 2379 2380
ENTRYPOINT ["/usr/local/bin/cairn"]
