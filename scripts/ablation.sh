#!/usr/bin/env bash
# The ablation of docs/ablation.md in one command: synthesise the data, train the aux net until
# its gain over bicubic stops improving, run the four-arm x three-seed search, write the report.
#   bash scripts/ablation.sh                                  # ~1 hour on 2 CPUs
#   bash scripts/ablation.sh configs/ablation_gpu.yaml        # the same four arms on one GPU
# Extra arguments go to every job (e.g. --set mlflow.tracking_uri=...).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/ablation.yaml}
shift $(( $# > 0 ? 1 : 0 ))
name=$(basename "$config" .yaml)
stamp=$(date -u +%Y%m%d-%H%M%S)
bash scripts/setup.sh
upsr=.venv/bin/upsr
data=runs/$name/data
# synth and train-aux read the search config's job sections (all but `tune`), resolved once.
jobs=runs/$name/jobs.yaml
mkdir -p "runs/$name"
.venv/bin/python -c 'import sys; from cli.config import load; from pipelines.config import to_yaml
print(to_yaml(load(sys.argv[1]).jobs()), end="")' "$config" > "$jobs"
"$upsr" synth --config "$jobs" --output "$data" --overwrite "$@"
aux_name=$name-aux-$stamp
"$upsr" train-aux --config "$jobs" --data "$data" --name "$aux_name" "$@"
# The run's last checkpoint: where it stopped (plateau) or its last step.
# (checkpoint_<8 digits>: Ray Train keeps its own checkpoint_manager_snapshot.json beside them)
aux=$(ls -d runs/ray_results/"$aux_name"/checkpoint_[0-9]* | sort | tail -n 1)
"$upsr" tune --config "$config" --data "$data" --aux "$aux" --name "$name-$stamp" --report docs/"$name".md "$@"
