#!/usr/bin/env bash
# README command 1: installs everything, trains the default small CNN on the six ID classes of
# fashion_mnist_6v4, scores GROOD, MSP, Energy and KNN, prints the table and writes the report
# (runs/fmnist6v4/report: results.json, results.csv, results.md, PNG plots, report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKDIR=${WORKDIR:-runs/fmnist6v4}
.venv/bin/python train.py --config configs/fashion_mnist_6v4_cnn.py --workdir "$WORKDIR"
.venv/bin/python score.py --ckpt "$WORKDIR" --detectors grood,msp,energy,knn --out "$WORKDIR/report"
