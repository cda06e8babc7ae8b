"""kohya LoRA keys spelled with the original checkpoint's (LDM / SGM) UNet names, mapped to
diffusers' module names.

kohya's sd-scripts trains SDXL on its own copy of the original UNet, so SDXL LoRAs name
``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` for diffusers'
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``; some SD 1.5 / 2.1 tools write
the same spelling. The original UNet numbers its blocks in one run per part:

- ``input_blocks.N``: ``0`` is ``conv_in``; then, per down block, one entry per resnet
  (``.0`` the resnet, ``.1`` its attention) and one for the downsampler (``.0.op``);
- ``middle_block.0`` / ``.1`` / ``.2``: resnet 0, the attention, resnet 1;
- ``output_blocks.N``: per up block, one entry per resnet (``.0`` the resnet, ``.1`` its
  attention, the block's last entry also holding the upsampler as ``.1.conv`` without
  attention or ``.2.conv`` with it).

The numbering is read off the UNet's own modules, so it follows its ``layers_per_block`` and
which blocks have attention (SD 1.5 / 2.1: the first three down blocks; SDXL: the last two).
Inside an attention block the names are diffusers' already (``transformer_blocks_0_attn2_to_k``,
``ff_net_0_proj``, ``proj_in``); resnet parts are renamed (``in_layers_2`` → ``conv1`` …).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_INPUT = re.compile(r"^input_blocks_(?P<index>\d+)_(?P<part>\d+)(?:_(?P<rest>.+))?$")
_MIDDLE = re.compile(r"^middle_block_(?P<part>\d+)(?:_(?P<rest>.+))?$")
_OUTPUT = re.compile(r"^output_blocks_(?P<index>\d+)_(?P<part>\d+)(?:_(?P<rest>.+))?$")
_DOWN_MODULE = re.compile(r"^down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)$")
_UP_MODULE = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)$")
_OUTSIDE_BLOCKS = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
    "out_0": "conv_norm_out",
    "out_2": "conv_out",
}
_RESNET_PARTS = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "emb_layers_1": "time_emb_proj",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "skip_connection": "conv_shortcut",
}
_MIDDLE_PARTS = {0: "mid_block_resnets_0", 1: "mid_block_attentions_0", 2: "mid_block_resnets_1"}


@dataclass(frozen=True)
class LdmLayout:
    """Where each ``input_blocks`` / ``output_blocks`` entry of the original UNet sits in a
    diffusers UNet: ``(block, resnet)``, with resnet ``None`` for a downsampler entry."""

    inputs: tuple[tuple[int, int | None], ...]  # input_blocks 1, 2, …
    outputs: tuple[tuple[int, int], ...]  # output_blocks 0, 1, …
    attentions: frozenset[str]  # the UNet's attention modules, underscored

    @classmethod
    def of(cls, module_names: Iterable[str]) -> LdmLayout:
        names = set(module_names)
        down: list[tuple[int, int, int]] = []  # (block, 0 resnet | 1 downsampler, index)
        up: list[tuple[int, int]] = []
        for name in names:
            if (match := _DOWN_MODULE.match(name)) is not None:
                down.append((int(match[1]), match[2] == "downsamplers", int(match[3])))
            elif (match := _UP_MODULE.match(name)) is not None:
                up.append((int(match[1]), int(match[2])))
        inputs = tuple(
            (block, None if sampler else index) for block, sampler, index in sorted(down)
        )
        attentions = frozenset(
            name.replace(".", "_") for name in names if re.fullmatch(r".+\.attentions\.\d+", name)
        )
        return cls(inputs=inputs, outputs=tuple(sorted(up)), attentions=attentions)

    def diffusers_spelling(self, spelled: str) -> str | None:
        """The diffusers module name (``.`` written ``_``) for a kohya module spelled with the
        original UNet's names, or ``None`` when it is not one (or this UNet has no such block)."""
        if spelled in _OUTSIDE_BLOCKS:
            return _OUTSIDE_BLOCKS[spelled]
        if (match := _INPUT.match(spelled)) is not None:
            return self._input(int(match["index"]), int(match["part"]), match["rest"])
        if (match := _MIDDLE.match(spelled)) is not None:
            prefix = _MIDDLE_PARTS.get(int(match["part"]))
            return None if prefix is None else _inner(prefix, match["rest"])
        if (match := _OUTPUT.match(spelled)) is not None:
            return self._output(int(match["index"]), int(match["part"]), match["rest"])
        return None

    def _input(self, index: int, part: int, rest: str | None) -> str | None:
        if not 1 <= index <= len(self.inputs):
            return None
        block, resnet = self.inputs[index - 1]
        if resnet is None:  # a downsampler entry: its one module is ``op``
            return f"down_blocks_{block}_downsamplers_0_conv" if (part, rest) == (0, "op") else None
        kind = {0: "resnets", 1: "attentions"}.get(part)
        return None if kind is None else _inner(f"down_blocks_{block}_{kind}_{resnet}", rest)

    def _output(self, index: int, part: int, rest: str | None) -> str | None:
        if index >= len(self.outputs):
            return None
        block, resnet = self.outputs[index]
        attention = f"up_blocks_{block}_attentions_{resnet}"
        if part == 0:
            return _inner(f"up_blocks_{block}_resnets_{resnet}", rest)
        has_attention = attention in self.attentions
        if part == 1 and has_attention:
            return _inner(attention, rest)
        last = max(r for b, r in self.outputs if b == block)
        if part == 1 + has_attention and rest == "conv" and resnet == last:  # the upsampler
            return f"up_blocks_{block}_upsamplers_0_conv"
        return None


def _inner(prefix: str, rest: str | None) -> str | None:
    if rest is None:
        return None
    if "_resnets_" in prefix:
        rest = _RESNET_PARTS.get(rest, rest)
    return f"{prefix}_{rest}"
