# syntax=docker/dockerfile:1
# persistence-agent container image.
#   docker build -t persistence-agent .
# Build stage: dependencies are compiled in their own layer, cached until Cargo.toml or
# Cargo.lock change; the project's sources are compiled after.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev zlib1g-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
# The manifest names benches/decode.rs: a placeholder lets it parse.
RUN mkdir src benches && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
 && echo 'fn main() {}' > benches/decode.rs \
 && cargo build --release --locked \
 && rm -rf src benches
COPY src src
COPY benches benches
COPY migrations migrations
COPY schemas schemas
ARG GIT_SHA=unknown
ENV GIT_SHA=${GIT_SHA}
# Touch so cargo rebuilds the crate rather than reuse the placeholder's artifacts.
# zlib is the one shared library the binary needs that distroless lacks; it goes where the
# image's OpenSSL libraries are, /usr/lib/<multiarch>.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
 && mkdir -p /out \
 && cp target/release/persistence-agent /out/ \
 && dir="/out/root/usr/lib/$(gcc -print-multiarch)" \
 && mkdir -p "$dir" \
 && cp -L "$(dpkg -L zlib1g | grep 'libz.so.1$')" "$dir/libz.so.1"

# Runtime: distroless (glibc, OpenSSL, CA certificates; no shell, no package manager),
# running as the image's non-root user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG GIT_SHA=unknown
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="persistence-agent" \
      org.opencontainers.image.description="Consumes persistence requests from Kafka and writes each to PostgreSQL in one serializable transaction, with retry tiers and a dead-letter topic" \
      org.opencontainers.image.source="https://github.com/persistence-agent/persistence-agent" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}"
COPY --from=build /out/root/ /
COPY --from=build /out/persistence-agent /usr/local/bin/persistence-agent
USER 65532:65532
EXPOSE 8080
ENV HTTP_ADDR=0.0.0.0:8080 \
    LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/persistence-agent"]
CMD ["run"]
