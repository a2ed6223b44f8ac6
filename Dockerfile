# kiln compiles plugins at runtime, so its image keeps the Rust toolchain and the source of
# kiln-types (plugins are built against it).
FROM rust:1.95-bookworm
WORKDIR /kiln
COPY . .
RUN cargo build --release -p kiln && cp target/release/kiln /usr/local/bin/kiln
ENV KILN_ADDR=0.0.0.0:9999 \
    KILN_PLUGIN_DIRS=/kiln/plugins \
    KILN_BIN_DIR=/kiln/bin/plugins \
    KILN_BUILD_DIR=/kiln/.kiln/build \
    KILN_TYPES_DIR=/kiln/types
EXPOSE 9999
CMD ["kiln", "serve"]
