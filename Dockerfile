# syntax=docker/dockerfile:1
# The `cairn` store image: one static binary (musl) on distroless/static, run as the
# distroless `nonroot` user (65532). It carries the whole `cairn` command, so the same image
# serves the store, `cairn snapshot save/restore/status` (backup Jobs, restore init
# containers) and `cairn bench`. The operator runs it with `command: ["cairn"]` and a data
# volume at /var/lib/cairn (pods get fsGroup 65532, so the volume is writable).
#
#   docker build -t REGISTRY/cairn:0.1.0 .                      (from the repository root)
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/cairn:0.1.0 --push .
#
# Each platform compiles natively (under emulation for a foreign one): the Rust target is
# the builder's own architecture with musl.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# musl-tools: ring's C parts (rustls) compile with musl-gcc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
# The protos compile with protox (pure Rust) and raft-proto uses its bundled protoc: no
# system protoc. --locked: exactly the versions in Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-musl" \
 && cargo build --release --locked -p cairn --bin cairn --target "$target" \
 && install -D -m 0755 "target/$target/release/cairn" /out/cairn

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/cairn /usr/local/bin/cairn
USER 65532:65532
# Client (gRPC, HTTP/JSON gateway, /metrics, /readyz, /livez) and peer ports.
EXPOSE 2379 2380
ENTRYPOINT ["/usr/local/bin/cairn"]
