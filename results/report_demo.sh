#!/usr/bin/env bash
# The report's screenshot: the README's demo (fine-tune, EKFAC scores, 20 half-data retrains for the LDS, EKFAC
# self-influence), its report.py page, and headless Chromium's first screen of it -> results/report_demo.png.
# Usage: bash results/report_demo.sh [WORK_DIR]   (CPU, offline, about five minutes on 2 cores; needs chromium)
set -euo pipefail
W=${1:-/tmp/report_demo}; mkdir -p "$W"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
analyze() { python -c "import sys, analyze, utils; utils.run_script(lambda: print(analyze.main(sys.argv[1:])))" "$@" 2>/dev/null | tail -1; }
[ -f "$W/checkpoints/demo/model.safetensors" ] || python train.py --dataset demo --output_dir "$W/checkpoints/demo" 2>/dev/null
python retrain.py --dataset demo --lds_num_masks 20 --lds_output_dir "$W/lds" 2>/dev/null
scores=$(analyze --checkpoint_dir "$W/checkpoints/demo" --output_dir "$W/scores")
self=$(analyze --checkpoint_dir "$W/checkpoints/demo" --output_dir "$W/scores" --self_influence)
python evaluate_lds.py --scores "$scores" --lds_dir "$W/lds" 2>/dev/null | grep "^LDS"
python report.py --scores "$scores" --self_scores "$self" --output "$W/report.html"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,900 \
  --screenshot="$PWD/results/report_demo.png" "file://$W/report.html" 2>/dev/null
