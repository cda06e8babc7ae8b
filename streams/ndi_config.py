"""The ``[ndi]`` settings: publishing outputs as NDI sources (``livediff camera`` and ``serve``).

Pure data: nothing here imports the NDI binding. In a TOML file::

    [ndi]
    out = "livediff"   # camera: the source "livediff"; serve: one source per session
                       # (websocket or WebRTC), "livediff <session id>"

The sources themselves are :mod:`livediff.streams.ndi_io`.
"""

from __future__ import annotations

from dataclasses import dataclass

from livediff.settings import check_settings, setting


@dataclass(frozen=True)
class NdiConfig:
    """Where outputs go over NDI (see :mod:`livediff.streams.ndi_config`)."""

    out: str | None = setting(
        None,
        doc="publish the output as the NDI source NAME (serve: each session as "
        "'NAME <session id>'), with the input's frame rate and timestamps; needs "
        "pip install 'livediff[creative]'",
        special={None: "no NDI output"},
        max_length=200,
        flag="--ndi-out",
        metavar="NAME",
    )

    def __post_init__(self) -> None:
        check_settings(self, prefix="[ndi] ")
