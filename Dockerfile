# ttrl-serve on an NVIDIA GPU: `docker build -t ttrl-serve .` then
#   docker run --gpus all -p 8000:8000 \
#     -v ttrl-cache:/cache -v ttrl-data:/data ttrl-serve [--model org/name]
# The model cache (/cache: the default model, hub downloads, eval sets) and the adapter folder
# (/data) are volumes, so weights are fetched once and adapters survive the container.

# Build: CUDA's compiler and headers for candle's kernels, Rust from rustup.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS build
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH
# Hopper by default; 80 for A100, 89 for L4/L40S.
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY static static
COPY configs configs
# Cargo.toml names the integration test target, so its folder must exist.
COPY tests tests
RUN cargo build --profile dist --features cuda --locked

# Run: the CUDA runtime libraries only; python3 + pip fetch the default model on first use.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/dist/ttrl-serve /usr/local/bin/ttrl-serve
COPY configs /etc/ttrl-serve
ENV TTRL_SERVE_CACHE=/cache \
    TTRL_DATA_DIR=/data \
    HF_HOME=/cache/huggingface \
    TTRL_DEVICE=cuda:0 \
    TTRL_HOST=0.0.0.0 \
    TTRL_PORT=8000 \
    PIP_BREAK_SYSTEM_PACKAGES=1
VOLUME ["/cache", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD curl -fsS http://127.0.0.1:8000/ready || exit 1
ENTRYPOINT ["ttrl-serve", "serve"]
