"""Helpers for scripts/install.sh, so that it can say what it downloads before it does.

    python scripts/_pip_plan.py probe URL      exit 0 if URL answers within 10 s, else print why
    python scripts/_pip_plan.py summary REPORT one line: what pip's `--dry-run --report` would
                                               install, from where, which build, how big

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

# Installed size over download size, seen for torch's wheels (CPU: 183 MB -> 754 MB;
# CUDA with its nvidia-* libraries: about 3 GB -> 5 GB).
CPU_GROWTH, CUDA_GROWTH = 4.1, 1.7


def _ssl_context() -> ssl.SSLContext:
    # pip's certificate setting, when there is one, so that the probe sees what pip sees.
    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    return ssl.create_default_context(cafile=cafile if cafile and os.path.exists(cafile) else None)


def probe(url: str) -> int:
    try:
        with urllib.request.urlopen(
            url.rstrip("/") + "/torch/", timeout=10, context=_ssl_context()
        ):
            return 0
    except urllib.error.HTTPError as exc:  # it answered, but has no torch there
        print(f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        print(getattr(exc, "reason", None) or exc)
    return 1


def _size(url: str) -> int | None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        try:
            return os.path.getsize(urllib.request.url2pathname(parsed.path))
        except OSError:
            return None
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=5, context=_ssl_context()) as resp:
            length = resp.headers.get("Content-Length")
            return int(length) if length else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _mb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _where(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return f"the local file {urllib.request.url2pathname(parsed.path)} (pip's configuration points there)"
    if parsed.hostname == "files.pythonhosted.org":
        return "PyPI"
    return parsed.hostname or url


def summary(report_path: str) -> int:
    with open(report_path) as f:
        items = json.load(f).get("install", [])
    if not items:
        print("nothing (already installed)")
        return 0
    names = [i["metadata"]["name"].lower() for i in items]
    urls = [i.get("download_info", {}).get("url", "") for i in items]
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(_size, urls))
    torch = next((i for i in items if i["metadata"]["name"].lower() == "torch"), items[0])
    version = torch["metadata"]["version"]
    torch_url = torch.get("download_info", {}).get("url", "")
    cuda = any(n.startswith("nvidia-") for n in names) or "+cu" in version
    build = "the CUDA build" if cuda else "the CPU build"
    known = sum(s for s in sizes if s)
    total = _mb(known) if all(sizes) else f"at least {_mb(known)}"
    growth = CUDA_GROWTH if cuda else CPU_GROWTH
    others = f" with {len(items) - 1} more packages" if len(items) > 1 else ""
    line = (
        f"{torch['metadata']['name']} {version}, {build}, from {_where(torch_url)}{others}: "
        f"{total} to download, about {_mb(known * growth)} installed"
    )
    if cuda:
        line += " (CUDA libraries, useless without an NVIDIA GPU; torch still runs on the CPU)"
    print(line)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("probe", "summary"):
        sys.exit((probe if sys.argv[1] == "probe" else summary)(sys.argv[2]))
    sys.exit(__doc__)
