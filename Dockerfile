# Multi-stage build of registrar: a Rust build stage, then a slim runtime.
FROM rust:1-bookworm AS build
WORKDIR /src
# protoc and the google/protobuf includes for etcd-client's build: the same
# package list as ./scripts/install-deps uses, from scripts/deps.
COPY scripts/deps scripts/install-deps scripts/
RUN ./scripts/install-deps build && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bin registrar \
 && strip target/release/registrar

FROM debian:bookworm-slim
# ca-certificates for https checks and TLS to etcd; curl for http-ish exec checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/registrar /opt/bin/registrar
ENTRYPOINT ["/opt/bin/registrar"]
CMD ["--help"]
