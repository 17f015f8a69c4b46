#!/usr/bin/env bash
# The GPU check: LoRA tokens/s of kubetune against a plain transformers Trainer, with and without
# Liger kernels and packing, peak memory, full-SFT MFU and the exact-resume check on CUDA, in one
# table, on one H100/H200 in under 8 minutes (benchmarks/gpu_check.py does the measuring).
#
#   benchmarks/gpu_check.sh WHEELS_DIR      # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run       # a CPU rehearsal with a tiny model (tests run this)
#
# The GPU machine has only torch, transformers, peft and accelerate (and no network): everything
# else is installed from WHEELS_DIR without an index and without resolving dependencies, so the
# pins of benchmarks/gpu_check_requirements.txt are exactly what runs. Build WHEELS_DIR on a
# machine with network and the GPU machine's Python and platform (CPython 3.11, Linux x86_64):
#
#   pip wheel --no-deps -w WHEELS_DIR -r benchmarks/gpu_check_requirements.txt   # downloads wheels,
#   pip wheel --no-deps -w WHEELS_DIR .                                          # builds sdists; kubetune
#
# (from another platform: pip download --no-deps --only-binary=:all: --python-version 3.11
# --platform manylinux_2_28_x86_64 -d WHEELS_DIR -r ..., then pip wheel the few sdist-only ones).
#
# Exit status: 0 when every run finished and the resume was exact, 1 otherwise.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
dry_run=0
wheels=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h | --help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) wheels="$arg" ;;
    esac
done
python="${PYTHON:-python3}"
started=$(date +%s)

if [[ -n "$wheels" ]]; then
    [[ -d "$wheels" ]] || { echo "gpu_check.sh: $wheels is not a directory of wheels" >&2; exit 2; }
    echo "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels" >&2
    "$python" -m pip install --quiet --no-index --no-deps "$wheels"/*.whl
fi

"$python" - <<'EOF'
import importlib, sys
need = ["torch", "transformers", "peft", "accelerate", "datasets", "trl", "kubetune", "kubetune_trainer"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: cannot import {', '.join(missing)}: pass the wheels directory (see the top of this script)")
EOF

cd "$repo"
args=()
if [[ "$dry_run" == 1 ]]; then
    args+=(--dry-run)
else
    "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device (use --dry-run)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
status=0
"$python" benchmarks/gpu_check.py "${args[@]}" --json "${GPU_CHECK_JSON:-/tmp/kubetune-gpu-check.json}" || status=$?
echo "gpu check: $(( $(date +%s) - started )) s" >&2
exit "$status"
