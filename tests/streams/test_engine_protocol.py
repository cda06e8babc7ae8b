"""The real engine and its sessions are what the media edges expect (``EngineLike``/``SessionLike``).

The edges are typed against the protocols only, so a drift between them and the engine would
otherwise show first as an ``AttributeError`` on a live connection.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest

from helpers.streams_testing import TEST_RUNTIME
from livediff.engine.runtime import Engine
from livediff.models.bundle import ModelBundle
from livediff.streams.engine_protocol import EngineLike, SessionLike


def protocol_methods(protocol: type) -> Iterator[tuple[str, Any]]:
    for name, member in vars(protocol).items():
        if not name.startswith("_") and inspect.isfunction(member):
            yield name, member


def signature_problems(name: str, wanted: Any, real: Any) -> list[str]:
    if inspect.iscoroutinefunction(wanted) != inspect.iscoroutinefunction(real):
        return [f"{name}: async in one, not in the other"]
    have = inspect.signature(real).parameters
    problems = []
    for parameter in list(inspect.signature(wanted).parameters.values())[1:]:  # past self
        found = have.get(parameter.name)
        var_keyword = any(p.kind is p.VAR_KEYWORD for p in have.values())
        if found is None and not (parameter.kind is parameter.VAR_KEYWORD and var_keyword):
            problems.append(f"{name}: no parameter {parameter.name}")
        elif found is not None and found.kind is not parameter.kind:
            problems.append(f"{name}({parameter.name}): {found.kind} instead of {parameter.kind}")
        elif (
            found is not None
            and parameter.default is not parameter.empty
            and found.default is found.empty
        ):
            problems.append(f"{name}({parameter.name}): required, the protocol has a default")
    return problems


@pytest.mark.parametrize("protocol", [EngineLike, SessionLike])
def test_a_protocol_lists_only_methods_and_properties(protocol: type) -> None:
    members = {n for n in vars(protocol) if not n.startswith("_")}
    methods = {n for n, _ in protocol_methods(protocol)}
    properties = {n for n in members if isinstance(vars(protocol)[n], property)}
    assert members == methods | properties and methods and properties


async def test_the_engine_and_its_sessions_are_what_the_edges_expect(bundle: ModelBundle) -> None:
    engine = Engine(bundle, None, TEST_RUNTIME, None)
    await engine.start()
    try:
        session = await engine.open_session({"prompt": "a fox"})
        problems = []
        for protocol, real in ((EngineLike, engine), (SessionLike, session)):
            assert isinstance(real, protocol)  # every member is there
            for name, wanted in protocol_methods(protocol):
                problems += signature_problems(name, wanted, getattr(type(real), name))
        await session.close()
    finally:
        await engine.stop()
    assert problems == []


def test_the_signature_check_sees_a_drift() -> None:
    class Wanted:
        async def update(self, **changes: Any) -> None: ...

        def submit(self, image: Any, *, pts: int | None = None) -> None: ...

    class Drifted:
        def update(self, **changes: Any) -> None: ...

        def submit(self, image: Any, pts: int) -> None: ...

    assert signature_problems("update", Wanted.update, Drifted.update) == [
        "update: async in one, not in the other"
    ]
    assert len(signature_problems("submit", Wanted.submit, Drifted.submit)) == 1
