#!/usr/bin/env bash
# Parity of cmcl's encoders with the upstream packages (ImageBind and LanguageBind) under random
# weights. Builds a throw-away venv (nothing is installed into the calling environment), installs
# cmcl with the CPU torch pin, the upstream packages WITHOUT their dependencies (they would pull
# torchvision/torchaudio/decord and, through pip, possibly a CUDA torch) and the pinned libraries
# they import, then runs tests/test_encoders_parity.py and fails if any test is skipped.
#
#   bash scripts/parity.sh                 # temporary venv, removed afterwards
#   PARITY_VENV=/tmp/pv bash scripts/parity.sh   # build (or reuse) a venv kept at that path
#
# Takes about 3 minutes on a 2-core CPU, most of it installing torch and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}

if [[ -n "${PARITY_VENV:-}" ]]; then
    VENV=$PARITY_VENV
else
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    VENV=$TMP/venv
fi
if [[ ! -x $VENV/bin/python ]]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# Every install below is constrained to this torch, so no resolver step can swap in another build.
CONSTRAINTS=$VENV/parity-constraints.txt
echo "$TORCH_PIN" > "$CONSTRAINTS"

"${PIP[@]}" -c "$CONSTRAINTS" "$TORCH_PIN" -e ".[test,languagebind]"
# Upstream code, no dependencies: imagebind-unofficial's and languagebind's declared requirements
# include torchvision/torchaudio; the parity tests import only their model modules.
"${PIP[@]}" --no-deps imagebind-unofficial==0.1.1 languagebind==0.1.0
# What those model modules import, at the versions languagebind 0.1.0 runs with.
"${PIP[@]}" -c "$CONSTRAINTS" einops iopath portalocker \
    transformers==4.40.2 tokenizers==0.19.1 "huggingface_hub<1" peft==0.11.1 accelerate==0.30.1
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -i -E '^(torch|transformers|tokenizers|huggingface.hub|peft|accelerate|ftfy|languagebind|imagebind-unofficial) '
if "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torchvision', 'torchaudio')))"; then
    :
else
    echo "parity.sh: torchvision/torchaudio got installed; the parity environment must not contain them" >&2
    exit 1
fi

LOG=$VENV/parity-pytest.log
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs tests/test_encoders_parity.py 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -ne 0 ]]; then
    exit "$rc"
fi
if grep -q -E '[0-9]+ skipped' "$LOG"; then
    echo "parity.sh: some parity tests were skipped; upstream must be importable here" >&2
    exit 1
fi
echo "parity.sh: all parity tests ran and passed"
