# kiln in a container. kiln compiles plugins at runtime, so the runtime image keeps the Rust
# toolchain and the source of kiln-types (plugins are built against it). Plugins are not part of
# the image: docker-compose.yml mounts ./plugins, and kiln builds them when it starts.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /kiln
# 1. Dependencies, in a layer of their own: the manifests and the lock file with empty sources.
#    Editing kiln's code does not invalidate this layer, so its ~230 crates are not rebuilt.
#    (The workspace's benchmark links plugins/powertable, so its manifest is needed too.)
COPY Cargo.toml Cargo.lock ./
COPY core/Cargo.toml core/
COPY types/Cargo.toml types/
COPY bench/Cargo.toml bench/
COPY plugins/powertable/Cargo.toml plugins/powertable/
RUN mkdir -p core/src types/src bench/src plugins/powertable/src \
    && echo 'fn main() {}' > core/src/main.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && touch core/src/lib.rs types/src/lib.rs plugins/powertable/src/lib.rs \
    && cargo build --release --locked -p kiln \
    && rm -rf core/src types/src
# 2. kiln itself. `touch`: the copied sources may carry mtimes older than the stubs above.
COPY sql sql
COPY types types
COPY core core
RUN touch core/src/main.rs core/src/lib.rs types/src/lib.rs \
    && cargo build --release --locked -p kiln \
    && cp target/release/kiln /usr/local/bin/kiln

FROM rust:1.95-slim-bookworm
COPY --from=build /usr/local/bin/kiln /usr/local/bin/kiln
COPY types /kiln/types
# State lives outside any Cargo workspace (an uploaded plugin must build as its own crate), in
# one volume. kiln runs as an unprivileged user; compose may pick another uid (KILN_UID), so the
# state directory is writable by any user, as /tmp is.
ENV KILN_ADDR=0.0.0.0:9999 \
    KILN_PLUGIN_DIRS=/kiln/plugins \
    KILN_TYPES_DIR=/kiln/types \
    KILN_DATA_DIR=/var/lib/kiln \
    KILN_BIN_DIR=/var/lib/kiln/bin \
    KILN_BUILD_DIR=/var/lib/kiln/build \
    KILN_INSTALL_DIR=/var/lib/kiln/installed \
    CARGO_HOME=/var/lib/kiln/cargo
RUN useradd --uid 1000 --create-home kiln \
    && mkdir -p /kiln/plugins /var/lib/kiln \
    && chmod 1777 /var/lib/kiln
USER 1000:1000
WORKDIR /kiln
EXPOSE 9999
CMD ["kiln", "serve"]
