#!/usr/bin/env bash
# Create .venv-tools with the offline linters that tests/test_k8s.py and tests/test_infra.py run. They live
# apart from .venv because checkov's pins (boto3 1.35, packaging 23, networkx 2.6, ...) conflict with the
# project's. Does nothing when the venv is newer than its pin files.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.venv-tools
stamp=$venv/.installed
pins=(tests/tools/requirements.txt tests/tools/constraints.txt)
if [[ -f $stamp && $stamp -nt ${pins[0]} && $stamp -nt ${pins[1]} ]]; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -r "${pins[0]}" -c "${pins[1]}"
"$venv/bin/python" -m pip check
touch "$stamp"
