"""Benchmarks: scripts that print numbers (JSON lines) and draw plots; never timed tests.

Suites: single stream and its stages (:mod:`.single`), many sessions (:mod:`.multi`), the
networks' device time kernel by kernel (:mod:`.kernel_profile`), glass to glass over WebRTC
(:mod:`.e2e`), peers side by side (:mod:`.peers`), the soak (:mod:`.soak`) and what the Ray ingress adds
(:mod:`.ray_ingress`); each Triton
kernel against its reference (:mod:`.kernels`). Each record carries the device,
date, commit and command (:mod:`.records`); results are kept in ``bench/results/``.
:mod:`.netns` runs a command in a loopback-only network namespace, for the e2e bench and the
WebRTC tests.

Entry points: ``livediff bench --suite …`` and ``python -m livediff.bench.<module>``. Benchmarks import every layer; the product imports
no benchmark (``tests/test_boundaries.py`` checks it).
"""
