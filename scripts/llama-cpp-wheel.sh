#!/usr/bin/env bash
# Build (once) and print the path of a llama-cpp-python wheel compiled for this CPU's SIMD level.
#
# llama-cpp-python ships only an sdist on PyPI, so it is compiled here. Its default build is
# GGML_NATIVE=ON (-march=native), which on CPUs advertising AMX compiles AMX int8 kernels that
# crash (SIGSEGV in ggml_backend_amx_mul_mat) on quantized models in some VMs. We therefore build
# with GGML_NATIVE=OFF and switch on exactly the SIMD extensions /proc/cpuinfo lists; AMX stays off.
# The wheel is kept in a wheelhouse keyed by version and flags, outside the repo, so a fresh clone on
# the same machine reuses it and a machine with other CPU flags builds its own.
#
# usage: scripts/llama-cpp-wheel.sh PYTHON VERSION    (prints the wheel path on stdout)
set -euo pipefail
py=${1:?python}
version=${2:?version}

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
  cpu=${pair%%:*}; opt=${pair##*:}
  if has "$cpu"; then args="$args -DGGML_${opt}=ON"; else args="$args -DGGML_${opt}=OFF"; fi
done
args="$args ${LLAMA_CMAKE_EXTRA:-}"

key=$(printf '%s|%s|%s' "$version" "$args" "$("$py" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-16)
house="${LORATUI_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/loratui/wheels}/llama-cpp-python-$version-$key"
wheel=$(ls "$house"/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "Building llama-cpp-python $version from source (about 10-20 minutes on 2 cores)" >&2
  echo "  CMAKE_ARGS=$args" >&2
  mkdir -p "$(dirname "$house")"
  tmp=$(mktemp -d "${house}.tmp.XXXX")
  trap 'rm -rf "$tmp"' EXIT   # a failed build leaves nothing behind
  CMAKE_ARGS="$args" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$py" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$tmp" "llama-cpp-python==$version" >&2
  printf '%s\n' "$args" > "$tmp/CMAKE_ARGS"
  rm -rf "$house"; mv "$tmp" "$house"   # atomic: a half-built wheelhouse is never picked up
  trap - EXIT
  wheel=$(ls "$house"/llama_cpp_python-*.whl | head -n1)
fi
printf '%s\n' "$wheel"
