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


def test_transformers_probe_answers_what_is_installed(tmp_path: Path) -> None:
    """transformers probes for ``kernels`` (by importing it when no distribution of that name is
    installed): in a checkout the probe must not fail, and must find Hugging Face's package
    exactly when it is installed (transformers 5.25+ brings it), never the folder."""
    code = (
        "import importlib.metadata as m\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import livediff.kernels.fused_step\n"
        "try:\n"
        "    installed = bool(m.version('kernels'))\n"
        "except m.PackageNotFoundError:\n"
        "    installed = False\n"
        "available = is_kernels_available()\n"
        "if installed:\n"
        "    import kernels\n"
        "print(installed, available, kernels.__file__ if installed else None)"
    )
    done = run_in_checkout(code, str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    installed, available, where = done.stdout.strip().splitlines()[-1].split(" ", 2)
    assert available == installed
    if installed == "True":  # the installed package, not the checkout's folder
        assert where != "None" and not Path(where).resolve().is_relative_to(REPO / "kernels")


def test_a_checkout_reached_by_a_symlink_is_still_the_checkout(tmp_path: Path) -> None:
    """The checkout on sys.path by another name (a symlink) is not taken for the installed
    package: the hand-over does not import the folder again (which would recurse)."""
    link = tmp_path / "link"
    link.symlink_to(REPO, target_is_directory=True)
    code = (
        "import importlib.metadata as m\n"
        "try:\n"
        "    installed = bool(m.version('kernels'))\n"
        "except m.PackageNotFoundError:\n"
        "    installed = False\n"
        "import kernels\n"
        "print(installed, kernels.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # the checkout only through the link
        env={**os.environ, "PYTHONPATH": str(link)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    installed, where = done.stdout.strip().splitlines()[-1].split(" ", 1)
    ours = Path(where).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert ours is (installed == "False")  # the installed package where there is one
