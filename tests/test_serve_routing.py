"""Language-model requests routed by their targets and by cost (issue 28), as clients see
it: one real server with the tiny Llama on two real devices of this host, the CPU and
lavapipe (each in its own worker process; lavapipe never runs in this process), priced
by a prices file so that the CPU is expensive and lavapipe cheap. Lavapipe is also made
slower per decode step than its start-up timing says (the `slowstep` fault), so that
the router has to measure it to know.

Where a request lands is read from the answer (`x-hxc-device`, the generate
extension's `device`) and compared with the server's own `/routing` view of the same
request made just before: the device the estimates ranked first. The estimates
themselves are never hard-coded here; the test picks its targets from them.

The tests run in order on one server: the first one needs lavapipe still unmeasured."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from test_serve import WAIT, Server, metric
from test_serve_llm import KEY, client, post, wait_for

SLOW_MS = 250  # lavapipe's extra time per batch step: far beyond what its start-up timing says
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llm_bundle):
    tmp = tmp_path_factory.mktemp("routing")
    bundle = tiny_llm_bundle
    prices = tmp / "prices.toml"
    prices.write_text('[devices]\n"local-task*" = 1.0\n"vulkan*" = 0.0001\n')
    env = {"HXC_API_KEY": KEY, "HXC_POOL_FAULT": f"vulkan:spirv:slowstep@{SLOW_MS}"}
    with Server(f"llm={bundle}", "--devices", "cpu,vulkan", "--prices", prices, env=env) as s:
        yield s


def routing(s: Server, **query) -> dict:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    status, _, body = s.http("GET", f"/v2/models/llm/routing?{q}", headers=AUTH)
    assert status == 200, body
    return json.loads(body)


def by_name(view: dict) -> dict[str, dict]:
    return {d["name"]: d for d in view["devices"]}


def generate(s: Server, **parameters) -> dict:
    status, _, doc = post(s, "/v2/models/llm/generate",
                          {"text_input": "The quick brown fox", "parameters": {"max_tokens": 8, "ignore_eos": True, **parameters}})  # fmt: skip
    assert status == 200, doc
    return doc


def test_a_device_slower_than_it_looked_is_avoided_once_measured(server):
    # Lavapipe is cheap and, by its start-up timing, fast enough for a time per token half
    # the fault's delay above what that timing says.
    looks = by_name(routing(server, prompt_tokens=5, max_tokens=8))["vulkan:spirv"]["tpot_ms"]
    targets = {"policy": "cost", "tpot_ms": looks + SLOW_MS / 2, "ttft_ms": 600_000}
    before = by_name(routing(server, prompt_tokens=5, max_tokens=8, **targets))
    assert before["vulkan:spirv"]["meets_targets"] and before["vulkan:spirv"]["chosen"], before
    first = generate(server, **targets)
    assert first["device"] == "vulkan:spirv"
    assert first["slo_missed"] is True  # measured: each step took SLOW_MS more
    after = by_name(routing(server, prompt_tokens=5, max_tokens=8, **targets))
    assert after["vulkan:spirv"]["tpot_ms"] > targets["tpot_ms"] and not after["vulkan:spirv"]["meets_targets"], after
    assert after["cpu:host"]["chosen"]
    second = generate(server, **targets)
    assert second["device"] == "cpu:host" and second["slo_missed"] is False


def test_loose_targets_go_to_the_cheapest_device_and_tight_ones_to_the_fast_one(server):
    c = client(server)
    loose = {"policy": "cost", "ttft_ms": 600_000, "tpot_ms": 100_000}
    view = routing(server, prompt_tokens=6, max_tokens=8, **loose)
    assert view["devices"][0]["name"] == "vulkan:spirv"  # both meet them; lavapipe costs less per token
    cheap, dear = (by_name(view)[n]["price_per_1k_tokens"] for n in ("vulkan:spirv", "cpu:host"))
    assert cheap < dear
    raw = c.completions.with_raw_response.create(model="llm", prompt="The quick brown fox", max_tokens=8, temperature=0,
                                                 extra_body=loose)  # fmt: skip
    assert raw.headers["x-hxc-device"] == "vulkan:spirv"
    assert raw.parse().usage.model_extra["slo_missed"] is False
    # A first-token target between the two devices' estimates: only the faster one meets it.
    ttft = {n: d["ttft_ms"] for n, d in by_name(view).items()}
    fast = min(ttft, key=ttft.get)
    target = (ttft["cpu:host"] * ttft["vulkan:spirv"]) ** 0.5
    tight = {"policy": "cost", "ttft_ms": target, "tpot_ms": 100_000}
    assert routing(server, prompt_tokens=6, max_tokens=8, **tight)["devices"][0]["name"] == fast
    raw = c.completions.with_raw_response.create(model="llm", prompt="The quick brown fox", max_tokens=8, temperature=0,
                                                 extra_body=tight)  # fmt: skip
    assert raw.headers["x-hxc-device"] == fast


def test_an_impossible_target_is_served_by_the_soonest_and_counted_as_a_miss(server):
    missed_before = metric(server.metrics(AUTH), "hxc_inference_slo_misses_total", model="llm")
    view = routing(server, prompt_tokens=6, max_tokens=8, ttft_ms=0.001)
    assert not any(d["meets_targets"] for d in view["devices"])
    soonest = min((d for d in view["devices"] if d["eligible"]), key=lambda d: d["ttft_ms"])["name"]
    c = client(server)
    chunks = list(c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ttft_ms": 0.001}))  # fmt: skip
    assert chunks[-1].usage.model_extra["slo_missed"] is True
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)  # served all the same
    status, headers, _ = post(server, "/v2/models/llm/generate", {"text_input": "Hi", "parameters": {"ttft_ms": 0.001}})
    assert status == 200 and headers["x-hxc-device"] == soonest and headers["x-hxc-slo-missed"] == "true"
    wait_for(server, "hxc_inference_slo_misses_total", missed_before + 2, model="llm")  # a stream is counted as it closes
    text = server.metrics(AUTH)
    assert metric(text, "hxc_lm_deadline_misses_total", model="llm", deadline="ttft") >= 2
    assert metric(text, "hxc_lm_cost_per_1k_tokens", model="llm", device="cpu:host") > 0


def test_bad_routing_fields_are_one_line_errors_in_each_api(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="llm", prompt="Hi", max_tokens=2, extra_body={"policy": "cheapest"})
    assert "'policy' must be one of latency, cost" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="llm", prompt="Hi", max_tokens=2, extra_body={"precision": ["int8"]})
    assert "no device of this model runs precision 'int8'; it has fp32" in str(e.value)
    status, _, doc = post(server, "/v2/models/llm/generate", {"text_input": "Hi", "parameters": {"ttft_ms": -1}})
    assert status == 400 and "ttft_ms" in doc["error"] and "\n" not in doc["error"]
    status, _, body = server.http("GET", "/v2/models/llm/routing?prompt_tokens=x", headers=AUTH)
    assert status == 400 and b"prompt_tokens" in body
    status, _, _ = server.http("GET", "/v2/models/llm/routing?prompt_tokens=5")
    assert status == 401  # the debug view needs the key like every model route


def test_select_refuses_a_prompt_longer_than_the_context_in_one_line(server):
    bundle = server.args[server.args.index("serve") + 1].split("=", 1)[1]
    out = subprocess.run([sys.executable, "-m", "hxc.cli", "select", bundle, "--prompt-tokens", "500"],
                         capture_output=True, text=True, timeout=WAIT)  # fmt: skip
    assert out.returncode != 0 and "context holds 96 tokens" in out.stderr and "Traceback" not in out.stderr
