#!/usr/bin/env bash
# Run every benchmark against the champion model, one after another (they must not share the CPU).
# Results: benchmarks/results/*.json; logs: benchmarks/results/*.log
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
mkdir -p benchmarks/results
$py benchmarks/phase2_batchnorm.py 2>benchmarks/results/phase2_batchnorm.log | tee benchmarks/results/phase2_batchnorm.txt
$py benchmarks/runtimes.py 2>benchmarks/results/runtimes.log | tee benchmarks/results/runtimes.txt
$py benchmarks/small_faces.py --modes off upscale tile --score-thresholds 0.5 0.3 --min-sides 0 640 800 2>benchmarks/results/small_faces.log | tee benchmarks/results/small_faces.txt
$py benchmarks/box_adjust.py --modes off upscale --min-sides 0 640 2>benchmarks/results/box_adjust.log | tee benchmarks/results/box_adjust.txt
$py benchmarks/load.py --variant "default:" --variant "1-thread:serve.inference_threads=1" \
    --variant "opencv-yunet:detector.engine=opencv" 2>benchmarks/results/load.log | tee benchmarks/results/load.txt
$py benchmarks/load.py --variant "gevent:" --variant "sync:serve.worker_class=sync" --seconds 15 \
    --out benchmarks/results/load_worker_class.json 2>>benchmarks/results/load.log | tee -a benchmarks/results/load.txt
$py benchmarks/hostile.py 2>benchmarks/results/hostile.log | tee benchmarks/results/hostile.txt
$py benchmarks/slow_clients.py 2>benchmarks/results/slow_clients.log | tee benchmarks/results/slow_clients.txt
$py benchmarks/model_load.py 2>benchmarks/results/model_load.log | tee benchmarks/results/model_load.txt
$py benchmarks/model_logging.py 2>benchmarks/results/model_logging.log | tee benchmarks/results/model_logging.txt
$py benchmarks/determinism.py 2>benchmarks/results/determinism.log | tee benchmarks/results/determinism.txt
$py benchmarks/int8_fidelity.py 2>benchmarks/results/int8_fidelity.log | tee benchmarks/results/int8_fidelity.txt
$py benchmarks/calibration.py --detection 2>benchmarks/results/calibration.log | tee benchmarks/results/calibration.txt
$py benchmarks/video_smoothing.py 2>benchmarks/results/video_smoothing.log | tee benchmarks/results/video_smoothing.txt
# The trained face detector, when one is configured (maskwatch train-detector, then MASKWATCH_DETECTOR_PATH).
if [ -n "${MASKWATCH_DETECTOR_PATH:-}" ]; then
  $py benchmarks/detectors.py --sides 800 960 2>benchmarks/results/detectors.log | tee benchmarks/results/detectors.txt
  $py benchmarks/detector_validation.py --run "$(dirname "$MASKWATCH_DETECTOR_PATH")" 2>benchmarks/results/detector_validation.log | tee benchmarks/results/detector_validation.txt
  $py benchmarks/detector_class_head.py 2>benchmarks/results/detector_class_head.log | tee benchmarks/results/detector_class_head.txt
  $py benchmarks/test_time_augmentation.py 2>benchmarks/results/test_time_augmentation.log | tee benchmarks/results/test_time_augmentation.txt
  $py benchmarks/detectors.py --timing-only 2>>benchmarks/results/detectors.log | tee -a benchmarks/results/detectors.txt
fi
