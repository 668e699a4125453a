#!/bin/sh
# Read every GPU signal once through the real NVML path (nvidia-ml-py -> libnvidia-ml.so.1)
# and print it with the verdicts and repair actions gpud would give.
#
#   scripts/gpu-check.sh [CONFIG]     (CONFIG: a gpud.toml; its [gpus] thresholds apply)
#
# Exit 0: NVML works and every GPU is healthy. 1: NVML works but a GPU or the node is not
# healthy (each reason and repair action is printed). 2: NVML is unavailable (no driver or no
# nvidia-ml-py); the reason is printed. Run as root to include the kernel log's XIDs.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"
    elif [ -x /opt/gpud/bin/python ]; then python=/opt/gpud/bin/python
    else python=python3; fi
fi
cd "$here"
exec "$python" -m gpud.gpus check "$@"
