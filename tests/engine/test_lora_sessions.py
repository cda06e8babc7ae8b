"""Sessions with different per-session LoRAs share one UNet call, and each gets what a single
stream gets from a model with its LoRAs fused into the weights (the oracle: the LoRA equation
written into a copy of the UNet, no LoRA code of livediff involved).

The tiny model's attention and feed-forward linears take the LoRAs; the files are real
``.safetensors`` files in the diffusers / PEFT and the kohya layouts.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_testing import make_frame, receive, reference_outputs

from helpers.lora_testing import fused_copy, random_lora, save_kohya, save_peft
from livediff.engine.config import GenerationParams, StreamConfig
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.stream import Stream
from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_store import LoraCapacity
from livediff.models.lora_uses import LoraUse, lora_uses

CONFIG = StreamConfig(width=64, height=64)
BASE = GenerationParams(strength=0.5, steps=2)
CALM = RuntimeConfig(
    deadline_ms=3_600_000, inbox_size=8, outbox_size=16, degrade=DegradePolicy(enabled=False)
)
TOLERANCE = 1  # uint8 levels: a call over padded rows may sum in another order
SETUPS: list[dict[str, Any]] = [
    {"prompt": "a red fox", "seed": 1, "loras": [{"name": "ink", "scale": 0.8}]},
    {"prompt": "a blue whale", "seed": 2, "loras": ["pastel:1.0", "ink:-0.5"]},
    {"prompt": "a tree", "seed": 3},
]


@pytest.fixture(scope="module")
def styled(tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model with a LoRA library holding ink (PEFT, rank 8, alpha 4) and pastel
    (kohya, rank 4, no alpha), and each LoRA's layers and file scale for the oracle."""
    base = tiny_bundle.unet
    folder = tmp_path_factory.mktemp("loras")
    ink = random_lora(base, 8, 11, strength=3.0)
    pastel = random_lora(base, 4, 12, every=2, strength=3.0)
    bundle = dataclasses.replace(tiny_bundle, unet=copy.deepcopy(base))
    library = LoraLibrary.attach(bundle.unet, LoraCapacity(max_loras=4, max_rank=16))
    library.load("ink", str(save_peft(ink, folder / "ink.safetensors", alpha=4.0)))
    library.load("pastel", str(save_kohya(pastel, folder / "pastel.safetensors")))
    return {
        "bundle": bundle.with_loras(library),
        "layers": {"ink": (ink, 0.5), "pastel": (pastel, 1.0)},
    }


def fused_bundle(tiny_bundle: ModelBundle, styled: dict[str, Any], uses: Any) -> ModelBundle:
    loras = [
        (styled["layers"][use.name][0], use.scale * styled["layers"][use.name][1])
        for use in lora_uses(uses)
    ]
    return dataclasses.replace(tiny_bundle, unet=fused_copy(tiny_bundle.unet, loras))


def largest_gap(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> int:
    return max(int(np.abs(a[i].astype(np.int16) - b[i]).max()) for i in a)


async def test_sessions_with_different_loras_share_calls_and_equal_the_fused_model(
    tiny_bundle: ModelBundle, styled: dict[str, Any]
) -> None:
    frames = 4
    engine = Engine(styled["bundle"], CONFIG, CALM, BASE)
    sessions = [await engine.open_session(params) for params in SETUPS]
    for k, session in enumerate(sessions):
        for i in range(frames):
            session.submit(make_frame(k, i))
    await engine.start()  # every frame waits already: the three sessions share each call
    try:
        for k, params in enumerate(SETUPS):
            inputs = [make_frame(k, i) for i in range(frames)]
            plain = {key: value for key, value in params.items() if key != "loras"}
            oracle = fused_bundle(tiny_bundle, styled, params.get("loras", ()))
            expected = reference_outputs(oracle, CONFIG, BASE.updated(**plain), inputs)
            outputs = await receive(sessions[k], len(expected))
            assert [out.index for out in outputs] == sorted(expected)
            got = {out.index: out.image for out in outputs}
            assert largest_gap(got, expected) <= TOLERANCE, k
            if "loras" in params:  # the LoRAs matter beyond the tolerance: it can fail
                without = reference_outputs(tiny_bundle, CONFIG, BASE.updated(**plain), inputs)
                assert largest_gap(without, expected) > 4 * TOLERANCE
        assert engine.metrics()["batch_sessions"]["max"] == 3
    finally:
        await engine.stop()


async def test_one_style_for_every_session_is_merged_and_equals_the_fused_model(
    tiny_bundle: ModelBundle, styled: dict[str, Any]
) -> None:
    """A lone session's LoRAs are folded into the weights after a few calls (its calls then
    carry no LoRA inputs) and its frames stay the fused model's; a session with another LoRA
    joining puts the base weights back, and both stay their own fused models'."""
    library = styled["bundle"].loras
    library.merge.forget()
    merges = library.merge.merges
    sent: list[bool] = []
    bundle = styled["bundle"]
    calls = dataclasses.replace(bundle)  # the same model, its UNet calls recorded

    def predict_noise(batch: Any) -> Any:
        sent.append(batch.lora_indices is not None)
        return bundle.predict_noise(batch)

    object.__setattr__(calls, "predict_noise", predict_noise)
    frames = 8
    engine = Engine(calls, CONFIG, CALM, BASE)
    await engine.start()
    try:
        lone = await engine.open_session(SETUPS[0])
        inputs = [make_frame(0, i) for i in range(frames)]
        plain = {key: value for key, value in SETUPS[0].items() if key != "loras"}
        oracle = fused_bundle(tiny_bundle, styled, SETUPS[0]["loras"])
        expected = reference_outputs(oracle, CONFIG, BASE.updated(**plain), inputs)
        got = {}
        for i, frame in enumerate(inputs):  # one frame at a time: one call each
            lone.submit(frame)
            if i >= BASE.steps - 1:
                out = (await receive(lone, 1))[0]
                got[out.index] = out.image
        assert largest_gap(got, expected) <= TOLERANCE
        assert library.merge.merges == merges + 1
        assert sent[-1] is False and sent[0] is True  # per-row first, then merged
    finally:
        await engine.stop()
    # Both styles queued before the start: the calls hold both sessions.
    sent.clear()
    engine = Engine(calls, CONFIG, CALM, BASE)
    sessions = [await engine.open_session(params) for params in SETUPS[:2]]
    for k, session in enumerate(sessions):
        for i in range(4):
            session.submit(make_frame(k, i))
    await engine.start()
    try:
        for k, session in enumerate(sessions):
            plain = {key: value for key, value in SETUPS[k].items() if key != "loras"}
            oracle = fused_bundle(tiny_bundle, styled, SETUPS[k]["loras"])
            inputs = [make_frame(k, i) for i in range(4)]
            expected = reference_outputs(oracle, CONFIG, BASE.updated(**plain), inputs)
            got = {out.index: out.image for out in await receive(session, len(expected))}
            assert largest_gap(got, expected) <= TOLERANCE, k
        assert engine.metrics()["batch_sessions"]["max"] == 2
        assert sent and all(sent)  # per-row: the weights were put back first
        assert library.merge.merged == ()
    finally:
        await engine.stop()


async def test_unknown_loras_are_refused_and_the_session_goes_on(styled: dict[str, Any]) -> None:
    engine = Engine(styled["bundle"], CONFIG, CALM, BASE)
    await engine.start()
    try:
        with pytest.raises(ParameterError, match="unknown LoRA 'watercolor'") as opened:
            await engine.open_session({"loras": ["watercolor"]})
        assert opened.value.field == "loras"
        session = await engine.open_session(SETUPS[0])
        with pytest.raises(ParameterError, match="unknown LoRA 'watercolor'") as updated:
            await session.update(loras=[{"name": "watercolor", "scale": 1.0}])
        assert updated.value.field == "loras"
        with pytest.raises(ParameterError, match="combines up to 2") as crowded:
            await session.update(loras=["ink", "pastel", "other"])
        assert crowded.value.field == "loras"
        await session.update(loras=["pastel:0.4"])
        session.submit(make_frame(0, 0))
        session.submit(make_frame(0, 1))
        assert (await receive(session, 1))[0].index == 0
        assert session.stats()["closed"] is False
    finally:
        await engine.stop()


def test_a_model_without_a_library_refuses_session_loras(tiny_bundle: ModelBundle) -> None:
    with pytest.raises(ParameterError, match="no per-session LoRA library") as caught:
        Stream(tiny_bundle, CONFIG, BASE, loras=["ink"])
    assert caught.value.field == "loras"


def test_a_live_switch_applies_from_the_next_call(
    tiny_bundle: ModelBundle, styled: dict[str, Any]
) -> None:
    """With one step (no frames in flight) the frame after a switch is the fused model's."""
    one_step = BASE.updated(steps=1)
    stream = Stream(styled["bundle"], CONFIG, one_step, loras=["ink:0.8"])
    stream.process(make_frame(0, 0))
    stream.update(loras=["pastel:1.0"])
    (after,) = stream.process(make_frame(0, 1))
    oracle = fused_bundle(tiny_bundle, styled, ["pastel:1.0"])
    expected = reference_outputs(oracle, CONFIG, one_step, [make_frame(0, 1)])
    assert largest_gap({0: after.numpy()}, {0: expected[0]}) <= TOLERANCE
    stream.update(loras=[])
    (plain,) = stream.process(make_frame(0, 2))
    unstyled = reference_outputs(tiny_bundle, CONFIG, one_step, [make_frame(0, 2)])
    assert largest_gap({0: plain.numpy()}, {0: unstyled[0]}) <= TOLERANCE


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ink:0.5,pastel", (LoraUse("ink", 0.5), LoraUse("pastel", 1.0))),
        ([{"name": "ink", "scale": -2}], (LoraUse("ink", -2.0),)),
        ("my:lora", (LoraUse("my:lora", 1.0),)),
    ],
)
def test_lora_uses_parse(value: Any, expected: tuple[LoraUse, ...]) -> None:
    assert lora_uses(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ink:11", "out of range"),
        (["ink", "ink:0.3"], "each LoRA once"),
        ([{"lora": "ink"}], "unknown: lora"),
        ([f"l{i}" for i in range(9)], "at most 8"),
        (3, "expected a list"),
    ],
)
def test_lora_uses_refuse(value: Any, message: str) -> None:
    with pytest.raises(ParameterError, match=message) as caught:
        lora_uses(value)
    assert caught.value.field == "loras"


def test_the_session_setting_is_declared(tmp_path: Path) -> None:
    params = GenerationParams(loras=[{"name": "ink", "scale": 0.25}])
    assert params.loras == (LoraUse("ink", 0.25),)
    assert params.updated(loras="pastel").loras == (LoraUse("pastel", 1.0),)


async def test_no_session_can_take_a_lora_while_it_is_being_unloaded(
    tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    """The in-use check runs on the event loop and the unload on the worker; between the two
    a session asking for the LoRA would point at a slot about to be freed (and reused)."""
    import asyncio
    import threading

    from livediff.exceptions import ConflictError

    ink = save_peft(random_lora(tiny_bundle.unet, 4, 21), tmp_path / "ink.safetensors", alpha=4.0)
    bundle = dataclasses.replace(tiny_bundle, unet=copy.deepcopy(tiny_bundle.unet))
    library = LoraLibrary.attach(bundle.unet, LoraCapacity(max_loras=2, max_rank=16))
    library.load("ink", str(ink))
    engine = Engine(bundle.with_loras(library), CONFIG, CALM, BASE)
    await engine.start()
    hold = threading.Event()
    try:
        session = await engine.open_session({"prompt": "a tree"})
        (device,) = engine._devices
        held = device.worker.between_batches(hold.wait)  # the worker is busy: unload must wait
        unload = asyncio.ensure_future(engine.unload_lora("ink"))
        await asyncio.sleep(0.05)
        assert not unload.done()
        with pytest.raises(ParameterError, match="'ink' is being unloaded") as updated:
            await session.update(loras=["ink"])
        assert updated.value.field == "loras"
        with pytest.raises(ParameterError, match="'ink' is being unloaded"):
            await engine.open_session({"loras": ["ink"]})
        hold.set()
        await asyncio.wrap_future(held)
        assert (await unload)["name"] == "ink"
        assert library.names() == ()

        library.load("ink", str(ink))  # a session opening with it counts as a user
        opening = asyncio.ensure_future(engine.open_session({"loras": ["ink"]}))
        await asyncio.sleep(0)  # the open is under way: its Stream is being built
        assert engine._opening_params
        with pytest.raises(ConflictError, match="used by 1 session"):
            await engine.unload_lora("ink")
        opened = await opening
        assert [use.name for use in opened.params.loras] == ["ink"]
        await session.update(loras=["ink:0.5"])  # refused unloads leave the LoRA usable
    finally:
        hold.set()  # a failed check must not leave the worker waiting
        await engine.stop()
