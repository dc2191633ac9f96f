#!/usr/bin/env bash
# Install the optional `alfworld` extra: the TextWorld engine and ALFWorld 0.3.5's text-game modules.
#
# Usage: scripts/install_alfworld.sh [PYTHON]   (default: the repo's .venv/bin/python, else python3)
#
# Why not `pip install alfworld`: alfworld 0.3.5 declares torch, torchvision, ai2thor, opencv and
# flask for its 3D simulator, and torchvision from PyPI would replace our CPU torch with a
# multi-GB CUDA build. The text games need none of them, so the four packages below go in without
# their declared dependencies, and their real runtime dependencies are listed explicitly. Jericho
# (imported by textworld) is built without spaCy, which only its unused action generator needs.
# fast-downward-textworld and jericho are source builds (a C++ compiler, make and cmake): the first
# run takes a few minutes, later runs reuse pip's wheel cache.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
pip=("$python" -m pip install --disable-pip-version-check)

# Whatever torch is installed stays exactly as it is.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$python" - >"$constraints" <<'EOF'
import importlib.metadata as metadata
try:
    print(f"torch=={metadata.version('torch')}")
except metadata.PackageNotFoundError:
    pass
EOF

"${pip[@]}" --no-deps alfworld==0.3.5 textworld==1.7.0 jericho==3.3.1 fast-downward-textworld==20.6.4
"${pip[@]}" --constraint "$constraints" \
  tatsu==5.8.3 'hashids>=1.2.0' 'mementos>=1.3.1' more-itertools prompt-toolkit termcolor \
  'tqdm>=4.17.1' 'networkx>=2' 'numpy>=1.14.5'

# Fails with the reason when anything is still missing.
"$python" -c "from retroact.envs.alfworld import load_engine; load_engine(); print('alfworld extra: ok')"
