"""The ``[lora_library]`` settings: the per-session LoRA library of ``livediff serve`` / ``run``.

Pure data and file listing: nothing here touches a model. In a TOML file::

    [lora_library]
    library = "/loras"        # a folder of .safetensors files, or a TOML file naming LoRAs
    max_loras = 8             # LoRAs loaded at once (the packed buffers' slots)
    max_rank = 64
    slots_per_row = 2         # LoRAs one session may combine
    merge = true              # fold the LoRAs in while every session uses the same ones

A folder loads each ``NAME.safetensors`` in it as ``NAME``. A TOML library file names them::

    [loras]
    ink = "/loras/ink.safetensors"                                   # a file, folder or HF id
    pastel = { source = "someone/pastel-lora", weight_name = "pastel.safetensors" }
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livediff.exceptions import ParameterError
from livediff.models.lora_merge import MergeConfig
from livediff.models.lora_store import MAX_RANK, MAX_SLOTS_PER_ROW, LoraCapacity
from livediff.settings import check_settings, setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FIELD = "library"


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA the library names at start: the name sessions use, and where it comes from."""

    name: str
    source: str
    weight_name: str | None = None


@dataclass(frozen=True)
class LoraLibraryConfig:
    """Whether the server has a per-session LoRA library, its sizes, and what it loads at start."""

    library: str | None = setting(
        None,
        doc="per-session LoRAs: a folder of NAME.safetensors files, or a TOML file with a "
        "[loras] table (name = source, or name = { source, weight_name }); loaded at start, "
        "more by POST /loras",
        special={None: "no per-session LoRA library"},
        flag="--lora-library",
        metavar="DIR_OR_TOML",
    )
    max_loras: int = setting(
        8,
        doc="per-session LoRAs loaded at once (device buffers are reserved for all of them)",
        min=1,
        max=1024,
        flag="--lora-slots",
        metavar="N",
    )
    max_rank: int = setting(
        64,
        doc="the largest rank a per-session LoRA may have",
        min=1,
        max=MAX_RANK,
        flag="--lora-max-rank",
        metavar="RANK",
    )
    slots_per_row: int = setting(
        2,
        doc="per-session LoRAs one session may combine",
        min=1,
        max=MAX_SLOTS_PER_ROW,
        flag="--lora-slots-per-row",
        metavar="N",
    )

    merge: bool = setting(
        True,
        doc="while every session of the calls uses the same LoRAs, fold them into the weights "
        "(fused speed; keeps a copy of the LoRA layers' base weights on the device)",
        flag="--no-lora-merge",
    )

    def __post_init__(self) -> None:
        check_settings(self, prefix="[lora_library] ")

    @property
    def enabled(self) -> bool:
        return self.library is not None

    @property
    def capacity(self) -> LoraCapacity:
        return LoraCapacity(self.max_loras, self.max_rank, self.slots_per_row)

    @property
    def merging(self) -> MergeConfig:
        return MergeConfig(enabled=self.merge)

    def entries(self) -> tuple[LoraEntry, ...]:
        """The LoRAs ``library`` names, in name order; ``ParameterError`` (``field="library"``)
        for a missing path, an empty folder, a bad TOML file or more LoRAs than ``max_loras``."""
        if self.library is None:
            return ()
        path = Path(self.library).expanduser()
        if path.is_dir():
            found = tuple(
                LoraEntry(file.stem, str(file)) for file in sorted(path.glob("*.safetensors"))
            )
            if not found:
                raise ParameterError(
                    f"--lora-library {path}: the folder holds no .safetensors files", field=FIELD
                )
        elif path.is_file():
            found = _entries_in_toml(path)
        else:
            raise ParameterError(f"--lora-library {path}: no such folder or file", field=FIELD)
        if len(found) > self.max_loras:
            raise ParameterError(
                f"--lora-library {path} names {len(found)} LoRAs; the library holds "
                f"{self.max_loras} (--lora-slots)",
                field=FIELD,
                limit=self.max_loras,
            )
        return found


def _entries_in_toml(path: Path) -> tuple[LoraEntry, ...]:
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle).get("loras")
    except tomllib.TOMLDecodeError as exc:
        raise ParameterError(
            f"--lora-library {path} is not valid TOML: {exc}", field=FIELD
        ) from None
    if not isinstance(table, dict) or not table:
        raise ParameterError(
            f"--lora-library {path}: expected a [loras] table of name = source", field=FIELD
        )
    return tuple(_entry(path, name, value) for name, value in sorted(table.items()))


def _entry(path: Path, name: str, value: Any) -> LoraEntry:
    if isinstance(value, str):
        value = {"source": value}
    if not isinstance(value, dict) or not isinstance(value.get("source"), str):
        raise ParameterError(
            f"--lora-library {path}: loras.{name} must be a source or {{ source, weight_name }}",
            field=FIELD,
        )
    unknown = sorted(set(value) - {"source", "weight_name"})
    weight_name = value.get("weight_name")
    if unknown or not (weight_name is None or isinstance(weight_name, str)):
        raise ParameterError(
            f"--lora-library {path}: loras.{name} takes source and weight_name (a text), "
            f"got {sorted(value)}",
            field=FIELD,
        )
    source = value["source"]
    if not Path(source).expanduser().is_absolute() and (path.parent / source).exists():
        source = str(path.parent / source)  # files named beside the library file
    return LoraEntry(name, source, weight_name)
