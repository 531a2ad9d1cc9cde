#!/usr/bin/env bash
# Runs every GPU-marked test on a GPU machine: `bash scripts/gpu_check.sh [extra pytest args]`.
# Wheels that the GPU image lacks (jax-triton) may sit in .whl/; they are installed into a private folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import jax_triton" 2>/dev/null; then
  site="$(mktemp -d)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
python3 -c "import jax; assert jax.default_backend() == 'gpu', 'gpu_check.sh needs a GPU: jax sees ' + jax.default_backend()"
exec python3 -m pytest -m gpu -q tests/ "$@"
