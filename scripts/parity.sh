#!/usr/bin/env bash
# Parity of cmcl's encoders with the upstream packages (ImageBind and LanguageBind) under random
# weights. Builds a throw-away venv (nothing is installed into the calling environment), installs
# cmcl[test] with the CPU torch pin (the test extra brings upstream LanguageBind and its pinned
# libraries), upstream ImageBind WITHOUT its dependencies (they would pull torchvision/torchaudio
# and, through pip, possibly another torch), then runs tests/test_encoders_parity.py and fails if
# any test is skipped.
#
#   bash scripts/parity.sh                 # temporary venv, removed afterwards
#   PARITY_VENV=/tmp/pv bash scripts/parity.sh   # build (or reuse) a venv kept at that path
#
# Takes about 3.5 minutes on a 2-core CPU, most of it installing torch and transformers.
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

# cmcl with its test extra, which holds upstream LanguageBind and the versions it runs with
# (transformers 4.40.2, tokenizers 0.19.1, huggingface_hub<1, peft 0.11.1, accelerate 0.30.1, ftfy).
"${PIP[@]}" -c "$CONSTRAINTS" "$TORCH_PIN" -e ".[test]"
# Upstream ImageBind without its dependencies (it declares torchvision, torchaudio, timm,
# pytorchvideo, decord); the parity test imports only its model modules.
"${PIP[@]}" -c "$CONSTRAINTS" iopath portalocker
"${PIP[@]}" --no-deps imagebind-unofficial==0.1.1
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
CMCL_PARITY_REPORT=1 "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs tests/test_encoders_parity.py 2>&1 | tee "$LOG"
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
