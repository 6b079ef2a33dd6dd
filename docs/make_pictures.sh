#!/usr/bin/env bash
# The README's pictures, drawn by jitgrad itself (`jitgrad show`, see docs/examples/textbook.py).
# Needs Graphviz's `dot` (apt-get install graphviz) and matplotlib (pip install -e ".[plot]").
set -euo pipefail
cd "$(dirname "$0")/.."
# Deep Learning fig. 6.11: the MLP with weight decay, forward graph G and backward graph B,
# fused kernels boxed.
python -m jitgrad show docs/examples/textbook.py:mlp_weight_decay --wrt 0,1 \
    --svg docs/img/mlp_weight_decay.svg
# A training step of a 16-layer network: the repeated layers collapse to one node each way.
python -m jitgrad show docs/examples/textbook.py:deep_chain --svg docs/img/deep_chain.svg
# Live memory of a 16-layer training step, storing everything vs recomputing (sqrt, a 3 MiB budget).
python -m jitgrad show docs/examples/textbook.py:deep_chain \
    --remat none --remat sqrt --remat 3MiB --timeline docs/img/memory_timeline.png
