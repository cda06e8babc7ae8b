"""``import kernels`` in the repository root finds the installed ``kernels`` package (Hugging
Face's, which transformers 5.25 and later import), not the checkout's ``kernels/`` folder,
which is ``livediff.kernels``. A fake installed package stands in for Hugging Face's, so the
test does not depend on which transformers is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_in_checkout(code: str, pythonpath: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # -c puts the current directory, the checkout, first on sys.path
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_installed_kernels_package_wins_over_the_folder(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "kernels" / "sub").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("MARK = 'installed'\n")
    (site / "kernels" / "sub" / "__init__.py").write_text("SUB = 'installed sub'\n")
    code = (
        "import kernels, kernels.sub, livediff.kernels.fused_step as ours\n"
        "print(kernels.MARK, '|', kernels.sub.SUB, '|', ours.__name__, '|', kernels.__file__)"
    )
    done = run_in_checkout(code, str(site))
    assert done.returncode == 0, done.stderr[-2000:]
    mark, sub, ours, where = (part.strip() for part in done.stdout.split("|"))
    assert (mark, sub, ours) == ("installed", "installed sub", "livediff.kernels.fused_step")
    assert Path(where).resolve() == (site / "kernels" / "__init__.py").resolve()


def test_without_an_installed_kernels_the_probes_say_absent(tmp_path: Path) -> None:
    """transformers probes for ``kernels`` by importing it when no distribution of that name is
    installed: the probe must neither fail nor find one."""
    code = (
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import livediff.kernels.fused_step\n"
        "print(is_kernels_available())"
    )
    done = run_in_checkout(code, str(tmp_path))  # nothing named kernels there
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
