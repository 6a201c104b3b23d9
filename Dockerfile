# Multi-stage build of registrar: a Rust build stage, then a slim runtime.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
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
