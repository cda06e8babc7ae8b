"""Every setting is declared once, and every surface agrees with its declaration.

The walk goes over each field of each config table (``[model]``, ``[stream]``, ``[params]``,
``[server]``, ``[runtime]``, ``[runtime.degrade]``): its flag exists in the commands that read
that table, typed as the field is; its TOML key is accepted and coerced; its query and control
spellings parse (live settings only); a value out of its range is refused by every surface,
naming the field; and README's reference is what the declarations write. The last tests add a
setting that exists nowhere else and show every surface picks it up.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from livediff.cli import build_parser
from livediff.engine.config import LIVE_PARAMETER_NAMES, GenerationParams
from livediff.exceptions import ParameterError
from livediff.models.control_uses import ControlNetSpec, ControlUse
from livediff.models.ip_adapter_spec import IPAdapterSpec, IPAdapterVariant
from livediff.models.lora_uses import LoraUse
from livediff.models.presets import PRESETS, LoraRef
from livediff.settings import (
    Declared,
    build,
    check_value,
    declared,
    describe,
    json_values,
    names,
    query_values,
    setting,
    table_values,
)
from livediff.settings.catalog import reference, tables
from livediff.settings.docs import block_of, default_text, markdown
from livediff.settings.flags import add_flags, flag_values
from livediff.streams.control_messages import params_from_query, session_params
from livediff.streams.server_config import IceServer

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES = tables()
SETTINGS = [
    pytest.param(table, cls, decl, id=f"{table}.{decl.name}")
    for table, cls, _ in TABLES
    for decl in declared(cls)
    if decl.nested is None
]
# The commands that read settings, with the arguments each needs, and which tables they read.
COMMANDS = {"run": ["in.mp4", "out.mp4"], "serve": [], "camera": ["--input", "in"], "export": ["f"]}
READ_BY = {
    "model": {"run", "serve", "camera", "export"},
    "stream": {"run", "serve", "camera"},
    "params": {"run", "serve", "camera"},
    "server": {"serve"},
    "runtime": {"serve", "camera"},
    "runtime.degrade": {"serve", "camera"},
    "ray": {"serve"},
    "ray.autoscaling": {"serve"},
    "osc": {"serve", "camera"},
    "ndi": {"serve", "camera"},
    "lora_library": {"run", "serve", "camera"},
}
# Values picked by hand, for settings whose check= takes shapes the type alone does not say or
# whose range depends on another setting: (value, flag/query text, checked).
SHAPED = {
    "recover_below": (0.1, "0.1", 0.1),  # below degrade_above
    "heartbeat_s": (0.5, "0.5", 0.5),  # two of them within replica_timeout_s
    "min_replicas": (2, "2", 2),  # at most max_replicas
    "prompt": ("a fox", "a fox", (("a fox", 1.0),)),
    "host_addresses": (["127.0.0.1"], "127.0.0.1", ("127.0.0.1",)),
    "ice_servers": (
        ["stun:s.example.org"],
        "stun:s.example.org",
        (IceServer(("stun:s.example.org",)),),
    ),
    "token": ("a-token-of-32-characters-0123456",) * 2 + ("a-token-of-32-characters-0123456",),
    "allowed_origins": (["https://Example.org/"], None, ("https://example.org",)),
    "loras": ([{"source": "my/lora", "scale": 0.5}], "my/lora:0.5", (LoraRef("my/lora", 0.5),)),
    "devices": (["cpu", "cuda:1"], "cpu,cuda:1", ("cpu", "cuda:1")),
    "controlnets": (
        [{"controlnet": "canny-net", "scale": 0.5}],
        "canny-net:0.5",
        (ControlUse("canny-net", 0.5),),
    ),
    "ip_adapter": (
        {"source": "random", "variant": "plus"},
        "random:plus",
        IPAdapterSpec("random", variant=IPAdapterVariant.PLUS),
    ),
    "ip_image": ("AB" * 32, "AB" * 32, "ab" * 32),
}
# Other settings a value needs in its table (SD 2.1, the default model, has no IP-Adapter).
NEEDS: dict[str, dict[str, Any]] = {"ip_adapter": {"preset": "sd15-lcm"}}
# The same, for settings named like another's: by the type of their items.
SHAPED_BY_ITEM: dict[Any, tuple[Any, str | None, Any]] = {
    ControlNetSpec: (
        [{"source": "random", "name": "edges"}],
        None,
        (ControlNetSpec("random", name="edges"),),
    ),
}
SHAPED_BY_ITEM[LoraUse] = ([{"name": "ink", "scale": 0.5}], "ink:0.5", (LoraUse("ink", 0.5),))
SHAPED_BAD_BY_ITEM: dict[Any, Any] = {
    ControlNetSpec: [{"source": "random", "scale": 2}],
    LoraUse: [{"name": "ink", "scale": 99}],
}
SHAPED_BAD = {
    "prompt": 42,
    "host_addresses": ["not-an-ip"],
    "ice_servers": [{"urls": ["http://x"]}],
    "token": "short",
    "allowed_origins": ["example.org"],
    "loras": [42],
    "devices": ["gpu7"],
    "controlnets": [{"controlnet": "canny-net", "scale": 9}],
    "ip_adapter": {"source": "random", "variant": "full-face"},
    "ip_image": "not-a-key",
}


def valid(decl: Declared) -> tuple[Any, str | None, Any]:
    """A value other than the default: as Python/TOML/JSON give it, as text, and as checked."""
    meta, kind = decl.setting, decl.kind
    if decl.item in SHAPED_BY_ITEM:
        return SHAPED_BY_ITEM[decl.item]
    if decl.name in SHAPED:
        return SHAPED[decl.name]
    if decl.is_enum:
        member = list(kind)[-1]
        return member.value, member.value, member
    if kind is bool:
        return (not decl.default), None, (not decl.default)
    if kind is str:
        text = meta.choices[-1] if meta.choices else "some text"
        return text, text, text
    low = meta.min if meta.min is not None else (meta.above + 1 if meta.above is not None else 0)
    if kind is tuple:
        items = [int(low), int(low) + 1]
        return items, ",".join(map(str, items)), tuple(items)
    high = meta.max if meta.max is not None else meta.below - 1 if meta.below else low
    number = kind(high)
    return number, str(number), number


def invalid(decl: Declared) -> Any:
    """A value every surface must refuse (out of range, not a choice, or the wrong type)."""
    meta, kind = decl.setting, decl.kind
    if decl.item in SHAPED_BAD_BY_ITEM:
        return SHAPED_BAD_BY_ITEM[decl.item]
    if decl.name in SHAPED_BAD:
        return SHAPED_BAD[decl.name]
    if decl.is_enum or meta.choices:
        return "no-such-choice"
    if kind is bool:
        return "yes"
    if kind is str:
        return 42
    if kind is tuple:
        return [5, 3]  # not increasing, or below the minimum
    if meta.max is not None or meta.below is not None:
        return (meta.max if meta.max is not None else meta.below) + 1
    return (meta.min if meta.min is not None else meta.above) - 1


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def expect_refusal(decl: Declared, call: Any) -> ParameterError:
    with pytest.raises(ParameterError) as refused:
        call()
    assert refused.value.field == decl.name, refused.value
    if decl.setting.check is None:  # the message says what is accepted, in the same words
        words = {str: "must be a string"}.get(decl.kind, describe(decl))
        assert words in str(refused.value) or "is not one of" in str(refused.value), refused.value
    return refused.value


# ---------------------------------------------------------------------- the walk
@pytest.mark.parametrize(("table", "cls", "decl"), SETTINGS)
def test_the_declaration_is_whole_and_its_default_passes(
    table: str, cls: type, decl: Declared
) -> None:
    meta = decl.setting
    assert meta.doc and not meta.doc.endswith("."), "a doc line: short, no full stop"
    assert not (meta.control and not meta.live), "a control key is a live setting"
    assert check_value(decl, decl.default) == getattr(build(cls), decl.name) or decl.default is None
    assert default_text(decl) and describe(decl)
    if meta.repeat or meta.from_flag:
        assert meta.flag is not None


@pytest.mark.parametrize(("table", "cls", "decl"), SETTINGS)
def test_its_flag_is_in_the_commands_of_its_table(table: str, cls: type, decl: Declared) -> None:
    flag = decl.setting.flag
    parsers = command_parsers()
    for command, start in COMMANDS.items():
        parser = parsers[command]
        action = parser._option_string_actions.get(flag) if flag else None
        if flag is None or command not in READ_BY[table]:
            assert action is None, (command, flag)
            continue
        assert action is not None, f"{command} has no {flag}"
        assert action.default is None and action.dest == decl.dest
        assert action.help is not None and action.help.replace("%%", "%").startswith(
            decl.setting.doc
        )
        if decl.is_enum:
            assert action.choices == [m.value for m in decl.kind]
        _, text, checked = valid(decl)
        argv = start + ([flag] if text is None else [flag, text])
        given = flag_values(cls, parser.parse_args(argv))
        assert check_value(decl, given[decl.name]) == checked, (command, given)


@pytest.mark.parametrize(("table", "cls", "decl"), SETTINGS)
def test_its_toml_key_is_accepted_coerced_and_checked(
    table: str, cls: type, decl: Declared
) -> None:
    value, _, checked = valid(decl)
    parent, _, sub = table.partition(".")
    owner = next(c for name, c, _ in TABLES if name == parent)

    def from_file(item: Any) -> Any:
        body = {sub: {decl.name: item}} if sub else {**NEEDS.get(decl.name, {}), decl.name: item}
        built = build(owner, table_values(owner, body, parent))
        return getattr(getattr(built, sub) if sub else built, decl.name)

    assert from_file(value) == checked
    expect_refusal(decl, lambda: from_file(invalid(decl)))
    with pytest.raises(ParameterError, match=rf"unknown key\(s\) in \[{table}\]: colour; known: "):
        table_values(cls, {"colour": 1}, table)


@pytest.mark.parametrize(("table", "cls", "decl"), SETTINGS)
def test_its_query_and_control_spellings(table: str, cls: type, decl: Declared) -> None:
    value, text, checked = valid(decl)
    meta = decl.setting
    if cls is not GenerationParams:  # only a session's parameters come from clients
        assert not (meta.live or meta.query or meta.control)
        return
    assert meta.live and meta.query and meta.control
    assert getattr(GenerationParams(**params_from_query({decl.name: text})), decl.name) == checked
    assert (
        getattr(GenerationParams().updated(**session_params({decl.name: value})), decl.name)
        == checked
    )
    bad = invalid(decl)
    expect_refusal(decl, lambda: GenerationParams().updated(**session_params({decl.name: bad})))
    if decl.kind in (int, float, tuple) and meta.check is None:  # any text is a valid string
        text = ",".join(map(str, bad)) if isinstance(bad, list) else str(bad)
        expect_refusal(decl, lambda: GenerationParams(**params_from_query({decl.name: text})))


def test_the_readme_lists_what_the_declarations_say() -> None:
    assert block_of(README.read_text(encoding="utf-8")) == reference(), (
        "README's settings block is stale: run python3 -m livediff.settings --write README.md"
    )
    for _, _, decl in (p.values for p in SETTINGS):
        assert f"| `{decl.name}` |" in reference() and describe(decl, none=False) in reference()


def test_live_names_and_preset_defaults_come_from_the_declarations() -> None:
    assert (
        LIVE_PARAMETER_NAMES
        == names(GenerationParams, "live")
        == names(GenerationParams, "control")
    )
    for preset in PRESETS.values():
        params = GenerationParams.for_preset(preset)
        assert (params.strength, params.steps) == (preset.default_strength, preset.default_steps)


def test_query_errors_name_the_field_and_stay_short() -> None:
    with pytest.raises(ParameterError, match=r"^seed='x' is not a number$") as refused:
        params_from_query({"seed": "x"})
    assert refused.value.field == "seed"
    with pytest.raises(
        ParameterError, match=r"^unknown parameter\(s\): colour; known: "
    ) as refused:
        params_from_query({"colour": "red"})
    assert refused.value.field == "colour"
    assert params_from_query({"similarity_threshold": "none"}) == {"similarity_threshold": None}
    with pytest.raises(
        ParameterError, match="seed=an integer of 31 digits is out of range"
    ) as refused:
        GenerationParams(**params_from_query({"seed": "1" + "0" * 30}))
    assert refused.value.field == "seed"
    with pytest.raises(ParameterError, match="lone surrogate") as refused:
        GenerationParams(**session_params({"negative_prompt": "\ud800"}))
    assert refused.value.field == "negative_prompt"


# ---------------------------------------------------------------------- a new setting
@dataclass(frozen=True)
class WithSharpness(GenerationParams):
    """Generation parameters plus one that exists nowhere else."""

    sharpness: float = setting(
        0.5, doc="how sharp the output is", min=0, max=2, live=True, flag="--sharpness"
    )
    sharpen_passes: int = setting(1, doc="passes of the sharpening filter", min=1, max=4)


def test_a_new_setting_reaches_every_surface() -> None:
    # flag: typed, ranged help, None when not given
    parser = argparse.ArgumentParser()
    add_flags(parser, WithSharpness)
    assert flag_values(WithSharpness, parser.parse_args(["--sharpness", "1.5"])) == {
        "sharpness": 1.5
    }
    assert "sharpness" not in flag_values(WithSharpness, parser.parse_args([]))
    assert "a number in [0, 2]" in parser.format_help()
    assert "--sharpen-passes" not in parser.format_help()  # declared without a flag
    # TOML, validation and its message
    assert (
        build(
            WithSharpness, table_values(WithSharpness, {"sharpen_passes": 3}, "params")
        ).sharpen_passes
        == 3
    )
    with pytest.raises(
        ParameterError, match=r"^sharpness=3 is out of range: expected a number in \[0, 2\]$"
    ):
        WithSharpness(sharpness=3)
    # query and control (live), refused where it is not live
    assert query_values(WithSharpness, {"sharpness": "0.25"}) == {"sharpness": 0.25}
    assert WithSharpness().updated(**json_values(WithSharpness, {"sharpness": 2})).sharpness == 2
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\): sharpen_passes") as refused:
        json_values(WithSharpness, {"sharpen_passes": 2})
    assert refused.value.field == "sharpen_passes"
    assert names(WithSharpness, "live") == LIVE_PARAMETER_NAMES | {"sharpness"}
    # the reference
    text = markdown([("params", WithSharpness, "generation parameters")])
    assert (
        "| `sharpness` | `--sharpness` | 0.5 | a number in [0, 2] | yes | how sharp the output is |"
        in text
    )
    assert (
        "| `sharpen_passes` |  | 1 | an integer in [1, 4] |  | passes of the sharpening filter |"
        in text
    )


def test_a_field_without_a_declaration_is_refused() -> None:
    @dataclass(frozen=True)
    class Undeclared(GenerationParams):
        colour: str = "red"

    with pytest.raises(TypeError, match=r"Undeclared.colour is not declared with setting"):
        declared(Undeclared)


# Options that are not settings: how to load and run, not what a config file holds.
NOT_SETTINGS = {"-h", "--help", "--audio", "--config", "--device", "--dtype", "--backend"}
NOT_SETTINGS |= {"--no-preset-lora", "--overwrite", "--output", "--loop", "--no-realtime"}
NOT_SETTINGS |= {"--input", "--input-format", "--input-size", "--input-fps", "--max-frames"}
NOT_SETTINGS |= {"--vcam", "--vcam-backend", "--vcam-device", "--vcam-fps"}
NOT_SETTINGS |= {"--ray"}  # a mode and a cluster address, not a setting of a table
NOT_SETTINGS |= {"--style-image"}  # a file read at start; the setting is its key, ip_image
NOT_SETTINGS |= {"--batch"}  # how livediff run splits its file job, like --audio


def test_every_other_option_of_a_command_is_a_declared_flag() -> None:
    declared_flags = {d.setting.flag for _, cls, _ in TABLES for d in declared(cls)} - {None}
    parsers = command_parsers()
    for command in COMMANDS:
        options = set(parsers[command]._option_string_actions)
        assert options - NOT_SETTINGS <= declared_flags, (
            command,
            options - NOT_SETTINGS - declared_flags,
        )


def test_the_readme_protocol_section_names_every_live_setting() -> None:
    """The data channel's list of JSON updates in the README is the declared live settings."""
    import re

    from livediff.engine.config import LIVE_PARAMETER_NAMES

    text = README.read_text(encoding="utf-8")
    start = text.index("carries JSON updates")
    listed = set(
        re.findall(r"`([a-z_]+)`", text[start : text.index("(optional `id` echoed)", start)])
    )
    assert listed == set(LIVE_PARAMETER_NAMES)


def test_a_flag_value_livediff_refuses_is_told_in_livediffs_words(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse says "invalid <function> value" for any ValueError; ours carry the reason."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--lora", "style/lora:inf"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("argument --lora: LoRA scale=inf is out of range: expected [-10, 10]"), (
        error
    )
