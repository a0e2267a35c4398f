"""The language-model serving simulator (`hxc.pool.lm_simulate`): its steps follow the
batch as `Batch.step` does, KV admission holds sequences back, and routing through the
real estimate and policies puts requests where the targets and prices say. Expected
values are worked out by hand from the speeds in each test."""

from __future__ import annotations

import pytest

from hxc.errors import UsageError
from hxc.pool.lm_estimate import DeviceLoad, LMSpeed, estimate
from hxc.pool.lm_simulate import INTERACTIVE_AND_BATCH, Arrival, LMDevice, RequestClass, simulate, trace

# 0.1 ms per prompt token from 100 tokens up (10 ms at most below it); decode 5 ms alone, 8 ms for two.
SPEED = LMSpeed(((100, 10.0), (200, 20.0)), ((1, 5.0), (2, 8.0)))


def one_device(slots: int = 2, kv_tokens: int = 10_000, **kw) -> LMDevice:
    return LMDevice("d", SPEED, slots=slots, kv_tokens=kv_tokens, price_per_hour=3600.0, chunks=(100,), **kw)


def test_steps_follow_the_batch() -> None:
    # Two 100-token prompts, 3 tokens each, at once on one device with two slots:
    # step 1 (0-15 ms): A's prompt (10) and A's decode alone (5): A has 2 tokens, its first at 15
    # step 2 (15-33): B's prompt (10) and a decode of A and B (8): A done (3 tokens) at 33, B's first at 33
    # step 3 (33-38): B alone (5): B done.
    r = simulate([one_device()], [Arrival(0.0, "x", 100, 3), Arrival(0.0, "x", 100, 3)], "latency")
    a, b = r.served
    assert (a.ttft_ms, a.e2e_ms, a.tpot_ms) == pytest.approx((15.0, 33.0, 9.0))
    assert (b.ttft_ms, b.e2e_ms, b.tpot_ms) == pytest.approx((33.0, 38.0, 2.5))
    (use,) = r.devices
    assert use.busy_s == pytest.approx(0.038)
    assert use.cost == pytest.approx(0.038)  # $3600/h is $1/s
    assert r.cost_per_million == pytest.approx(0.038 / 6 * 1e6)
    assert r.throughput == pytest.approx(6 / 0.038)


def test_prompt_read_in_chunks_while_others_decode() -> None:
    # B (150 tokens) arrives while A decodes, so it is read in the smallest chunk (50),
    # then, once A is done, in the largest it fills (50 left). Chunks 50 and 100.
    # step 1 (0-15):  A's 100 (the largest chunk, prefill(100) = 10) + decode A (5)     A: 2 tokens; B arrives at 1
    # step 2 (15-30): B's 0..50: prefill(50) - 0 = 10 (flat below 100) + decode A (5)   A: 3
    # step 3 (30-35): B's 50..100: prefill(100) - prefill(50) = 0 + decode A (5)        A: 4, done at 35
    # step 4 (35-45): B's 100..150: prefill(150) - prefill(100) = 5 + decode B (5)      B: 2, done at 45
    device = LMDevice("d", SPEED, slots=2, kv_tokens=10_000, price_per_hour=1.0, chunks=(50, 100))
    r = simulate([device], [Arrival(0.0, "x", 100, 4), Arrival(0.001, "x", 150, 2)], "latency")
    a, b = r.served
    assert a.e2e_ms == pytest.approx(35.0)
    assert (b.ttft_ms, b.e2e_ms) == pytest.approx((44.0, 44.0))  # its two tokens come with the same step


def test_largest_chunk_while_others_decode() -> None:
    # The what-if rule on the same arrivals: B's 150 read as 100 then 50.
    # step 2 (15-30): B's 0..100: prefill(100) = 10 + decode A (5)                    A: 3
    # step 3 (30-43): B's 100..150: 5, B's first token, decode of A and B (8)          A: 4 done, B: 2 done
    device = LMDevice("d", SPEED, slots=2, kv_tokens=10_000, price_per_hour=1.0, chunks=(50, 100),
                      smallest_while_decoding=False)  # fmt: skip
    a, b = simulate([device], [Arrival(0.0, "x", 100, 4), Arrival(0.001, "x", 150, 2)], "latency").served
    assert a.e2e_ms == pytest.approx(43.0)
    assert (b.ttft_ms, b.e2e_ms) == pytest.approx((42.0, 42.0))


def test_estimate_is_the_noiseless_truth_on_an_idle_device() -> None:
    # prefill(100) = 10, then the decode call its first token comes with: 5.
    e, _ = estimate(SPEED, DeviceLoad(0, 2, 0, 0, (), 10_000), 100, 3, 100, 1.0, 1)
    served = simulate([one_device()], [Arrival(0.0, "x", 100, 3)], "latency").served[0]
    assert e.ttft_ms == pytest.approx(15.0) and served.ttft_ms == pytest.approx(15.0)


def test_kv_admission_holds_a_request_back() -> None:
    # Each needs 100 + 3 = 103 tokens of KV; 150 hold one at a time, so B waits for A:
    # A: step 1 (0-15) prompt + decode, step 2 (15-20) decode: done at 20.
    # B: admitted at 20, step 3 (20-35), step 4 (35-40).
    r = simulate([one_device(kv_tokens=150)], [Arrival(0.0, "x", 100, 3), Arrival(0.0, "x", 100, 3)], "latency")
    a, b = r.served
    assert a.e2e_ms == pytest.approx(20.0)
    assert (b.ttft_ms, b.e2e_ms) == pytest.approx((35.0, 40.0))
    # With room for both (206 tokens) they share the steps as in test_steps_follow_the_batch.
    r = simulate([one_device(kv_tokens=206)], [Arrival(0.0, "x", 100, 3), Arrival(0.0, "x", 100, 3)], "latency")
    assert r.served[1].e2e_ms == pytest.approx(38.0)


def test_slots_are_taken_in_order() -> None:
    # One slot: B and C wait for it in arrival order.
    arrivals = [Arrival(0.0, "x", 100, 2), Arrival(0.001, "x", 100, 2), Arrival(0.002, "x", 100, 1)]
    r = simulate([one_device(slots=1)], arrivals, "latency")
    # A: 0-15 (prompt 10 + decode 5). B: 15-30. C: 30-40 (one token: no decode).
    assert [s.e2e_ms for s in r.served] == pytest.approx([15.0, 29.0, 38.0])


# A cheap slow device and an expensive fast one: per token the slow one costs half as much.
SLOW = LMDevice("slow", LMSpeed(((1, 1.0), (100, 100.0)), ((1, 10.0), (2, 10.0))), slots=4, kv_tokens=10_000,
                price_per_hour=0.5, chunks=(100,))  # fmt: skip
FAST = LMDevice("fast", LMSpeed(((1, 0.1), (100, 10.0)), ((1, 1.0), (2, 1.0))), slots=4, kv_tokens=10_000,
                price_per_hour=10.0, chunks=(100,))  # fmt: skip


def test_cost_routes_by_targets_and_price() -> None:
    # A 100-token prompt, 10 tokens: the slow one charges (100 + 10 x 10) ms x $0.5/h,
    # the fast one (10 + 10 x 1) ms x $10/h (twice as much). Estimated first token: 100 ms
    # on the slow one, 10 on the fast one. Arrivals 10 s apart, so each finds both idle.
    loose = Arrival(0.0, "loose", 100, 10, ttft_ms=1000.0, tpot_ms=20.0)
    tight = Arrival(10.0, "tight", 100, 10, ttft_ms=50.0, tpot_ms=20.0)
    impossible = Arrival(20.0, "impossible", 100, 10, ttft_ms=1.0, tpot_ms=20.0)
    r = simulate([SLOW, FAST], [loose, tight, impossible], "cost")
    by_kind = {s.kind: s for s in r.served}
    assert by_kind["loose"].device == "slow" and by_kind["loose"].met and not by_kind["loose"].expected_miss
    assert by_kind["loose"].ttft_ms == pytest.approx(110.0)  # its prompt and its first decode call
    assert by_kind["tight"].device == "fast" and by_kind["tight"].met
    # No device meets 1 ms: the soonest first token takes it, and it counts as a miss, expected and measured.
    assert by_kind["impossible"].device == "fast"
    assert by_kind["impossible"].expected_miss and not by_kind["impossible"].met
    assert r.attainment == pytest.approx(2 / 3)
    assert r.attainment_of("loose") == 1.0 and r.attainment_of("impossible") == 0.0
    # Latency sends even the loose one to the fast device.
    assert {s.device for s in simulate([SLOW, FAST], [loose, tight], "latency").served} == {"fast"}


def test_baselines() -> None:
    arrivals = [Arrival(i * 10.0, "x", 100, 10) for i in range(4)]
    assert [s.device for s in simulate([SLOW, FAST], arrivals, "fastest").served] == ["fast"] * 4
    assert [s.device for s in simulate([SLOW, FAST], arrivals, "round_robin").served] == ["slow", "fast"] * 2
    with pytest.raises(UsageError, match="unknown routing policy"):
        simulate([SLOW, FAST], arrivals, "cheapest")


def test_a_device_slower_than_its_profile_is_avoided_once_measured() -> None:
    # "liar" claims the fast device's speed but decodes 10x slower; latency routing tries
    # it first (listed first, equal estimates), measures it and then keeps to the honest one.
    liar = LMDevice("liar", LMSpeed(((1, 0.1), (100, 10.0)), ((1, 10.0), (2, 10.0))), slots=4, kv_tokens=10_000,
                    price_per_hour=1.0, chunks=(100,), profiled=FAST.speed)  # fmt: skip
    arrivals = [Arrival(i * 10.0, "x", 100, 20, tpot_ms=5.0) for i in range(6)]
    r = simulate([liar, FAST], arrivals, "latency")
    assert r.served[0].device == "liar" and not r.served[0].met  # 10 ms per token against 5
    assert all(s.device == "fast" and s.met for s in r.served[1:])


def test_deterministic_under_a_seed() -> None:
    classes = (RequestClass("a", 1.0, (50, 150), (2, 20), ttft_ms=100.0),)
    arrivals = trace(classes, 20.0, 5.0, seed=3)
    noisy = [LMDevice(f"d{i}", SPEED, slots=4, kv_tokens=1000, price_per_hour=1.0, noise=0.3) for i in range(2)]
    one, two = (simulate(noisy, arrivals, "cost", seed=1) for _ in range(2))
    assert one == two
    assert simulate(noisy, arrivals, "cost", seed=2).served != one.served  # the noise is drawn from the seed
    assert trace(classes, 20.0, 5.0, seed=3) == arrivals


def test_trace() -> None:
    arrivals = trace(INTERACTIVE_AND_BATCH, 10.0, 600.0, seed=0)
    assert 5400 < len(arrivals) < 6600  # Poisson: 6000 expected, sd 77
    assert all(0 < a.at_s < 600 for a in arrivals) and arrivals == sorted(arrivals, key=lambda a: a.at_s)
    interactive = [a for a in arrivals if a.kind == "interactive"]
    assert 0.67 < len(interactive) / len(arrivals) < 0.73
    assert all(128 <= a.prompt_tokens <= 512 and 64 <= a.max_tokens <= 128 and a.ttft_ms == 300 for a in interactive)
    assert all(1024 <= a.prompt_tokens <= 2048 and a.max_tokens == 256 and a.slo_ms == 60_000
               for a in arrivals if a.kind == "batch")  # fmt: skip
    # Another rate: the same requests, closer together.
    faster = trace(INTERACTIVE_AND_BATCH, 20.0, 300.0, seed=0)
    assert [(a.kind, a.prompt_tokens, a.max_tokens) for a in faster] == [(a.kind, a.prompt_tokens, a.max_tokens)
                                                                         for a in arrivals[:len(faster)]]  # fmt: skip
    assert [a.at_s for a in faster] == pytest.approx([a.at_s / 2 for a in arrivals[:len(faster)]])
    assert len(faster) >= len(arrivals) - 1


def test_the_price_is_the_device_time_a_sequence_adds() -> None:
    # $3600/h = $1 per device-second; 4 tokens after a 100-token prompt (10 ms to read).
    idle, _ = estimate(SPEED, DeviceLoad(0, 2, 0, 0, (), 10_000), 100, 4, 100, 3600.0, 1)
    # Alone it pays every step whole: 10 ms + 4 x 5 ms = 30 ms for 4 tokens.
    assert idle.price_per_unit == pytest.approx(0.030 / 4 * 1000)
    # Beside one sequence with 2 tokens left: 2 steps at step(2) - step(1) = 3 ms, then 2 whole ones.
    shared, _ = estimate(SPEED, DeviceLoad(1, 2, 0, 0, (2,), 10_000), 100, 4, 100, 3600.0, 1)
    assert shared.price_per_unit == pytest.approx((0.010 + 2 * 0.003 + 2 * 0.005) / 4 * 1000)


def test_a_prefill_call_costs_a_fixed_part_and_a_part_per_token() -> None:
    # Points made from 5 ms a call + 0.1 ms a token, read as a device reads them with chunks
    # 16 and 128: 32 tokens = two calls of 16, 128 = one call, 512 = four calls of 128.
    speed = LMSpeed(((32, 2 * 5 + 3.2), (128, 5 + 12.8), (512, 4 * 5 + 51.2)), ((1, 2.0),))
    assert speed.call_costs((16, 128)) == pytest.approx((5.0, 0.1))
    # 100 tokens beside others in 16-token calls: 7 calls (the last padded).
    assert speed.read_ms(100, 16, (16, 128)) == pytest.approx(7 * (5 + 1.6))
    # Riding in the decode calls (the mixed step): the fixed part is theirs; alone, a call's own.
    assert speed.read_ms(100, 16, (16, 128), riding=True) == pytest.approx(7 * 1.6)
    assert speed.read_ms(128, None, (16, 128), riding=True) == speed.read_ms(128, None, (16, 128))
    beside = DeviceLoad(1, 4, 0, 0, (50,), 10_000)
    separate, _ = estimate(speed, beside, 100, 8, 16, None, 1, largest_chunk=128)
    riding, _ = estimate(speed, beside, 100, 8, 16, None, 1, largest_chunk=128, mixed=True)
    assert separate.ttft_ms - riding.ttft_ms == pytest.approx(7 * 5.0)
    # One chunk size cannot tell the parts apart: the points are read as they are.
    assert speed.call_costs((32,)) is None and speed.read_ms(100, 32, (32,)) == speed.prefill_ms(100)
