#!/usr/bin/env bash
# Fills bench/vendor/ (gitignored) with the pure-Python packages bench/gpu_check.sh uses beyond what a GPU machine
# has preinstalled (torch, triton, pytest, pytest-benchmark): liger-kernel 0.8.5 (0.9 MB; needs only torch and triton),
# for the `liger` benchmark providers. The wheels are unpacked, not installed: gpu_check.sh puts the folder on
# PYTHONPATH, so a machine that cannot reach a package index needs no install step. Run this where pip works, then
# ship bench/vendor with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
dest=bench/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "liger-kernel==0.8.5"
rm -rf "$dest"
mkdir -p "$dest"
for wheel in "$tmp"/*.whl; do
    "$py" -m zipfile -e "$wheel" "$dest"
done
echo "bench/vendor: $(ls "$dest" | tr '\n' ' ')"
