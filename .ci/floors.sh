#!/usr/bin/env bash
# CI's check of the oldest libraries setup.py claims (.ci/floors.txt), in a virtual environment of
# its own: the loss, advantage, reward and data-loading tests, then one GRPO step and one SFT step
# of the embedded tiny model. The full suite runs afterwards with the newest releases.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet torch==2.13.0
"$py" -m pip install --quiet -e . pytest -c .ci/floors.txt
"$py" -m pip list 2>/dev/null | grep -iE '^(transformers|tokenizers|datasets|math-verify|latex2sympy2.extended) '
"$py" -m pytest -q -p no:cacheprovider tests/test_loss.py tests/test_advantages.py tests/test_rewards.py \
    tests/test_rewards_accuracy.py tests/test_data_loaders.py
tiny=(--train.max_steps 1 --train.eval_every 0 --data.num_eval 2 --train.export false --train.progress false)
"$py" train.py grpo "${tiny[@]}" --rollout.max_new_tokens 32 --train.output_dir "$work/grpo"
"$py" train.py sft "${tiny[@]}" --train.output_dir "$work/sft"
for run in grpo sft; do
    grep -q '"loss"' "$work/$run/metrics.jsonl" || { echo "floors: the $run step logged no loss" >&2; exit 1; }
done
echo "floors: the oldest claimed libraries pass"
