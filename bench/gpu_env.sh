# Source this on a bare GPU machine (the team's lent H100/H200) from the repo root:
#   source bench/gpu_env.sh
# Installs the carried wheels in .whl/ (bench/gpu_wheels.sh downloads them here) and this
# checkout into /tmp/site, without network, and puts them on PYTHONPATH.
# The device's copy of .git can be stale (2026-12-02): put LIVEDIFF_COMMIT=<this checkout's short hash>
# in the run's command so the records name the tree that ran (bench/records.py reads it).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD  # livediff itself runs from the checkout (see livediff/__init__.py)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, transformers, livediff; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
set +e
