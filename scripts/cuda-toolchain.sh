#!/usr/bin/env bash
# CUDA 13.0's compiler, headers and libraries from PyPI, so `cargo build --features cuda` works on a
# machine with no GPU and no system CUDA. Prints the environment to use:
#
#   eval "$(scripts/cuda-toolchain.sh)" && cargo build --release --features cuda
#
# PyPI has no libcuda (it ships with the driver), so the link uses a stub made from the driver symbols
# cudarc declares, with the real library's soname; on a GPU machine the driver's libcuda.so.1 loads
# instead. The binary needs CUDA 13 libraries (cudart, cublas, cublasLt, curand, nvrtc) and a driver
# that supports CUDA 13 (r580 or newer) where it runs.
set -euo pipefail

version=13.0
root=${TTRL_CUDA_ROOT:-$HOME/.cache/ttrl-serve/cuda-$version}
# Hopper (H100/H200) by default; set CUDA_COMPUTE_CAP=80 for A100, 89 for L4/L40.
compute_cap=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$root/venv/bin/python" ]; then
    python3 -m venv "$root/venv" >&2
fi
"$root/venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==$version.*" "nvidia-cuda-crt==$version.*" "nvidia-nvvm==$version.*" \
    "nvidia-cuda-runtime==$version.*" "nvidia-cuda-cccl==$version.*" "nvidia-cuda-nvrtc==$version.*" \
    "nvidia-cublas==$version.*" "nvidia-curand==10.4.*" >&2
toolkit=$("$root/venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')

# Unversioned names for the linker, and the driver stub, where cudarc looks (`$CUDA_HOME/lib/stubs`).
stubs=$toolkit/lib/stubs
mkdir -p "$stubs"
for lib in cudart cublas cublasLt nvrtc curand; do
    versioned=$(cd "$toolkit/lib" && ls "lib$lib.so."* | grep -v alt | head -1)
    ln -sf "../$versioned" "$stubs/lib$lib.so"
done
if [ ! -f "$stubs/libcuda.so" ]; then
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1)
    if [ -z "$cudarc" ]; then
        echo "cudarc's source is not in the cargo registry yet: run 'cargo fetch' first" >&2
        exit 1
    fi
    grep -oP '^pub unsafe fn \Kcu\w+' "$cudarc/src/driver/sys/mod.rs" | sort -u |
        sed 's/.*/int &(void) { return 999; }/' >"$stubs/libcuda.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda.c"
fi

cat <<EOF
export CUDA_HOME=$toolkit
export PATH=$toolkit/bin:\$PATH
export CUDA_COMPUTE_CAP=$compute_cap
export LD_LIBRARY_PATH=$toolkit/lib:\${LD_LIBRARY_PATH:-}
EOF
