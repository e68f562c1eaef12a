#!/usr/bin/env bash
# Issue 28's GPU run as one command (about 9 minutes on an H100 or H200), for the device tool:
#
#   bash bench/gpu_run.sh            # run with carry [".whl"]; the report comes back under $OUT
#
# The lent GPU machines have torch, triton and transformers but not math-verify, which the main
# job's accuracy reward needs, and no network. Before the run, on a machine with the registry:
#
#   pip download --no-deps -d .whl math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
#
# (.whl/ is git-ignored.) The three are pure-Python wheels: Python imports them from the wheel
# files on PYTHONPATH, nothing is installed. The report is bench/gpu/<date>-<gpu>.md (commit it),
# and a copy and the parts' logs go to $OUT.
set -u
cd "$(dirname "$0")/.."
PY=$(command -v python3 || command -v python)
for w in .whl/*.whl; do
    [ -e "$w" ] && PYTHONPATH="$PWD/$w${PYTHONPATH:+:$PYTHONPATH}"
done
export PYTHONPATH="${PYTHONPATH:-}"
"$PY" -c "import math_verify" 2>/dev/null || echo "math_verify is not importable: the main part will fail (see the header)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" bench/gpu_suite.py --parts tests,model,decode,compiled,main --budget "${BUDGET:-560}" \
    --workdir /tmp/gpu_suite "$@"
rc=$?
if [ -n "${OUT:-}" ]; then
    cp bench/gpu/*.md "$OUT"/ 2>/dev/null
    mkdir -p "$OUT/logs" && cp /tmp/gpu_suite/*.log "$OUT/logs/" 2>/dev/null
fi
exit $rc
