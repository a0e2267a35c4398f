"""`hxc serve` for language models (issue 27), as clients see it: a real server process
with the tiny random-weight Llama of `hxc.examples.llm` (4 batch slots), the real
`openai` Python client (streamed and not) and raw HTTP for the KServe generate
extension; every text compared with `generate`'s for the same prompt, sampling and seed
(in this process on the CPU, and once through `hxc generate` itself).

Continuous batching itself (hxc.runtime.batching) is checked in this process on the
CPU: sequences joining at different steps, in any slot, give `generate`'s tokens.
Lavapipe runs only in the server's worker processes (a heavy variant)."""

from __future__ import annotations

from collections import Counter
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

import hxc.runtime
from hxc.errors import UsageError
from hxc.runtime.batching import Batch
from hxc.runtime.generate import Sampling, Tokenizer
from test_serve import WAIT, Server, metric

SLOTS = 4
MAX_CONTEXT = 96
KEY = "llm-key-" + os.urandom(8).hex()
PROMPTS = ("The quick brown fox", "Hello world! How are you today?", "A compiler turns one program into another",
           "Numbers like 3, 14 and 2048 are tokens too. Every device runs the same bundle, token for token.", "A", "Every")  # fmt: skip
STEP_MS = 25  # the slow server's extra time per batch step: long enough to act while sequences run


@pytest.fixture(scope="module")
def bundle(tiny_llm_bundle) -> Path:
    # conftest's: context MAX_CONTEXT, SLOTS slots; for the CPU (and lavapipe, which test_serve_routing runs)
    return tiny_llm_bundle


@pytest.fixture(scope="module")
def model(bundle):
    """The bundle loaded here, on the CPU: the reference `generate`."""
    return hxc.runtime.load(bundle, device="cpu")


@pytest.fixture(scope="module")
def server(bundle):
    """The tiny Llama on the CPU behind an API key."""
    with Server(f"llm={bundle}", "--devices", "cpu", env={"HXC_API_KEY": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def slow(bundle):
    """The same, with every batch step 25 ms slower, a KV budget of ~100 tokens (two
    short sequences, not two long ones), two waiting requests at most and three streams."""
    budget_mb = 100 * 512 / 2**20  # 512 bytes of KV cache per token
    s = Server(f"llm={bundle}", "--devices", "cpu", "--kv-cache-mb", f"{budget_mb:.6f}", "--max-queue", "2",
               "--max-streams", "3", "--drain-timeout", "60", env={"HXC_POOL_FAULT": f"cpu:host:slowstep@{STEP_MS}"})  # fmt: skip
    with s:
        yield s


def client(s: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{s.url}/v1", api_key=key, max_retries=0, timeout=WAIT)


def reference(model, prompt=None, n: int = 16, **options):
    """What `generate` gives in this process (a `Generation`)."""
    return model.generate(prompt, n, **options).result()


def post(s: Server, path: str, doc, key: str = KEY) -> tuple[int, dict, object]:
    status, headers, body = s.http("POST", path, json.dumps(doc).encode(), {"Authorization": f"Bearer {key}"})
    return status, headers, json.loads(body) if body.startswith(b"{") else body


def events(body: bytes) -> list:
    """The `data:` payloads of a server-sent event stream."""
    out = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(s: Server, name: str, value: float, timeout: float = WAIT, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while metric(s.metrics({"Authorization": f"Bearer {KEY}"}), name, **labels) != value:
        assert time.monotonic() < deadline, f"{name} {labels} never became {value}"
        time.sleep(0.01)


# --- continuous batching, in this process ------------------------------------------------------


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "prefill-then-decode"])
def test_sequences_joining_at_any_step_in_any_slot_give_generates_tokens(model, mixed, monkeypatch):
    # mixed: a prompt read while others decode rides in their decode call (`mixed`);
    # else each step is a prefill call, then a decode call.
    calls: Counter[str] = Counter()
    call_flat = model.call_flat
    monkeypatch.setattr(model, "call_flat", lambda name, *a, **k: (calls.update([name]), call_flat(name, *a, **k))[1])
    tok = Tokenizer.of(model)
    sampling = {i: Sampling(0.0 if i % 2 == 0 else 0.9, top_p=0.95, seed=i) for i in range(len(PROMPTS))}
    wants = {i: (tok.encode(p), sampling[i]) for i, p in enumerate(PROMPTS)}
    refs = {i: list(reference(model, p, 40, temperature=sampling[i].temperature, top_p=0.95, seed=i, stop_token_ids=[]).token_ids)
            for i, p in enumerate(PROMPTS)}  # fmt: skip
    batch = Batch(model, mixed=mixed)
    got: dict[int, list[int]] = {i: [] for i in wants}
    finished: dict[int, str] = {}
    waiting = list(wants)
    slots = set()
    while waiting or not batch.idle:
        # One joins per step while a slot is free: sequences start at different steps,
        # and the later ones take the slots the first ones freed.
        if waiting and batch.free_slots:
            i = waiting.pop(0)
            slots.add(batch.add(i, wants[i][0], 40, wants[i][1], stop_token_ids=[]))
        for e in batch.step():
            got[e.id].append(e.token)
            if e.finish:
                finished[e.id] = e.finish
    assert slots == set(range(SLOTS))
    assert got == refs and set(finished.values()) == {"length"}
    assert (calls["mixed"] > 0) == mixed and calls["decode"] > 0


def test_a_cancelled_sequence_frees_its_slot_at_once_and_bad_input_is_one_line(model):
    batch = Batch(model)
    for i in range(SLOTS):
        batch.add(i, [0, 5, 6], 50)
    with pytest.raises(UsageError, match="every slot of the batch is taken"):
        batch.add("more", [0, 5], 5)
    batch.step()
    assert batch.cancel(2) and not batch.cancel(2) and batch.free_slots == 1
    batch.add("more", [0, 5], 5)
    assert 2 not in {e.id for e in batch.step()}
    for bad, match in (([], "empty"), ([10**6], "outside the vocabulary"), ([1] * (MAX_CONTEXT + 1), "context holds")):
        batch.cancel("x")
        batch.cancel(0)
        with pytest.raises(UsageError, match=match):
            batch.add("x", bad, 5)


# --- the OpenAI API ---------------------------------------------------------------------------


def test_completions_stream_and_not_equal_hxc_generate(server, bundle):
    """Greedy text from the openai client, whole and streamed, is what `hxc generate`
    prints for the same prompt (its own process, the same artifact)."""
    cli = subprocess.run([sys.executable, "-m", "hxc.cli", "generate", str(bundle), PROMPTS[1], "-n", "24", "--device", "cpu",
                          "--json"], capture_output=True, text=True, timeout=WAIT)  # fmt: skip
    want = json.loads(cli.stdout)
    c = client(server)
    r = c.completions.create(model="llm", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.text == want["text"] and choice.finish_reason == want["finish_reason"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want["prompt_token_ids"]), len(want["token_ids"]))
    assert r.object == "text_completion" and r.model == "llm" and r.id.startswith("cmpl-")
    chunks = list(c.completions.create(model="llm", prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want["text"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["token_ids"])
    assert all(ch.usage is None for ch in chunks[:-1]) and len({ch.id for ch in chunks}) == 1


def test_chat_completions_use_the_bundles_chat_template(server, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    want = reference(model, messages=messages, n=20)
    c = client(server)
    r = c.chat.completions.create(model="llm", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.object == "chat.completion"
    stream = c.chat.completions.create(model="llm", messages=messages, max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason and all(ch.usage is None for ch in chunks)
    # Content as a list of text parts is the same message.
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    assert c.chat.completions.create(model="llm", messages=parts, max_tokens=20, temperature=0).choices[0].message.content == want.text
    # Without max_tokens a chat reply may run to the end of the context.
    whole = c.chat.completions.create(model="llm", messages=messages, temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == MAX_CONTEXT - len(want.prompt_token_ids) + 1


def test_sampling_with_a_seed_top_p_top_k_and_stop_strings_equals_generate(server, model):
    c = client(server)
    want = reference(model, PROMPTS[0], 30, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    r = c.completions.create(model="llm", prompt=PROMPTS[0], max_tokens=30, temperature=0.8, top_p=0.9, seed=7,
                             extra_body={"top_k": 50})  # fmt: skip
    assert r.choices[0].text == want.text
    # A stop string cuts the text where it starts, as generate's does.
    stop = want.text[5:7] if len(want.text) > 7 else want.text[-1]
    cut = reference(model, PROMPTS[0], 30, temperature=0.8, top_p=0.9, top_k=50, seed=7, stop=[stop])
    for stream in (False, True):
        r = c.completions.create(model="llm", prompt=PROMPTS[0], max_tokens=30, temperature=0.8, top_p=0.9, seed=7,
                                 stop=[stop], stream=stream, extra_body={"top_k": 50})  # fmt: skip
        text = "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
        assert text == cut.text and stop not in text


def test_concurrent_requests_share_decode_steps_and_each_gets_its_own_text(server, model):
    """More requests than slots at once, greedy and sampled, streamed and not: each text
    is the one `generate` gives it alone, and the device ran several in one batch."""
    c = client(server)
    jobs = [(PROMPTS[i % len(PROMPTS)], 0.0 if i % 3 else 0.7, i, i % 2 == 0) for i in range(10)]
    wants = [reference(model, p, 60, temperature=t, seed=seed, stop_token_ids=[]).text for p, t, seed, _ in jobs]
    most = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            text = server.metrics({"Authorization": f"Bearer {KEY}"})
            most[0] = max(most[0], metric(text, "hxc_num_requests_running", model="llm"))
            time.sleep(0.005)

    def one(job) -> str:
        prompt, temperature, seed, stream = job
        r = c.completions.create(model="llm", prompt=prompt, max_tokens=60, temperature=temperature, seed=seed,
                                 stream=stream, extra_body={"ignore_eos": True})  # fmt: skip
        return "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(one, jobs))
    finally:
        done.set()
        watcher.join()
    assert got == wants
    assert most[0] >= 2  # sequences ran together (the gauge is sampled: it may miss the peak)


def test_models_health_metadata_and_kserve_infer(server):
    c = client(server)
    assert [m.id for m in c.models.list()] == ["llm"] and c.models.retrieve("llm").owned_by == "hxc"
    assert server.http("GET", "/v2/health/ready")[0] == 200
    status, _, body = server.http("GET", "/v2/models/llm", headers={"api-key": KEY})
    meta = json.loads(body)
    assert status == 200 and meta["inputs"][0]["name"] == "text_input" and meta["outputs"][0]["datatype"] == "BYTES"
    status, _, body = post(server, "/v2/models/llm/infer", {"inputs": []})
    assert status == 400 and "/v2/models/llm/generate" in body["error"] and "/v1/completions" in body["error"]


def test_errors_are_one_line_in_the_openai_shape_with_their_status(server):
    c = client(server)
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key="wrong").models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found" and "llm" in e.value.message
    for kwargs, param in (({"n": 2}, "n"), ({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo"),
                          ({"presence_penalty": 0.5}, "presence_penalty"), ({"temperature": 3}, "temperature"),
                          ({"max_tokens": 0}, "max_tokens"), ({"prompt": ["a", "b"]}, "prompt")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**{"model": "llm", "prompt": "x", **kwargs})
        assert e.value.status_code == 400 and e.value.body["param"] == param, kwargs
        assert "\n" not in e.value.message
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError, match="tools .* not supported"):
        c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "x"}], tools=tools)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "x"}], logprobs=True)
    with pytest.raises(openai.BadRequestError, match="context holds 96"):
        c.completions.create(model="llm", prompt=" ".join(["fox"] * 200))
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        c.completions.create(model="llm", prompt=[10**6])
    for body in (b"{not json", b"[1]"):
        status, _, reply = server.http("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
        error = json.loads(reply)["error"]
        assert status == 400 and set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_max_tokens_past_the_context_is_cut_to_it_with_finish_reason_length(server, model):
    want = reference(model, PROMPTS[3], 1000, stop_token_ids=[])
    r = client(server).completions.create(model="llm", prompt=PROMPTS[3], max_tokens=1000, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].finish_reason == "length" and r.choices[0].text == want.text
    assert r.usage.completion_tokens == MAX_CONTEXT - r.usage.prompt_tokens + 1 == len(want.token_ids)


# --- the KServe generate extension ---------------------------------------------------------------


def test_generate_extension_whole_and_streamed_equals_generate(server, model):
    want = reference(model, PROMPTS[2], 12)
    status, _, doc = post(server, "/v2/models/llm/generate", {"text_input": PROMPTS[2], "parameters": {"max_tokens": 12}, "id": "r1"})
    assert status == 200 and doc["text_output"] == want.text and doc["id"] == "r1"
    assert (doc["model_name"], doc["model_version"], doc["finish_reason"]) == ("llm", "1", want.finish_reason)
    # Triton's LLM models take the parameters beside text_input; and a version in the path.
    status, hdrs, body = server.http("POST", "/v2/models/llm/versions/1/generate_stream",
                                     json.dumps({"text_input": PROMPTS[2], "max_tokens": 12}).encode(), {"api-key": KEY})  # fmt: skip
    assert status == 200 and hdrs["content-type"].startswith("text/event-stream")
    parts = events(body)
    assert "".join(p["text_output"] for p in parts) == want.text and parts[-1]["completion_tokens"] == len(want.token_ids)
    seeded = reference(model, PROMPTS[2], 12, temperature=0.9, seed=3)
    status, _, doc = post(server, "/v2/models/llm/generate",
                          {"text_input": PROMPTS[2], "parameters": {"max_tokens": 12, "temperature": 0.9, "seed": 3}})  # fmt: skip
    assert doc["text_output"] == seeded.text
    for bad, match in (({"parameters": {"max_tokens": 12}}, "text_input"), ({"text_input": "x", "parameters": {"top_p": 2}}, "top_p")):
        status, _, doc = post(server, "/v2/models/llm/generate", bad)
        assert status == 400 and set(doc) == {"error"} and match in doc["error"]
    assert post(server, "/v2/models/nope/generate", {"text_input": "x"})[0] == 404
    assert post(server, "/v2/models/llm/generate", {"text_input": "x"}, key="wrong")[0] == 401


def test_metrics_count_tokens_latencies_and_requests(server):
    def get() -> str:
        return server.metrics({"Authorization": f"Bearer {KEY}"})

    before = get()
    c = client(server)
    r = c.completions.create(model="llm", prompt=PROMPTS[0], max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="llm", prompt="x", n=3)
    after = get()

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("hxc_time_to_first_token_seconds_count", model="llm", device="cpu:host") == 1
    assert grew("hxc_inter_token_latency_seconds_count", model="llm", device="cpu:host") == 19
    assert grew("hxc_e2e_request_latency_seconds_count", model="llm") == grew("hxc_time_per_output_token_seconds_count", model="llm") == 1
    assert grew("hxc_generation_tokens_total", model="llm") == 20
    assert grew("hxc_prompt_tokens_total", model="llm") == r.usage.prompt_tokens
    assert grew("hxc_lm_requests_total", endpoint="completions", status="ok", device="cpu:host") == 1
    assert grew("hxc_lm_requests_total", endpoint="completions", status="400") == 1
    assert grew("hxc_goodput_requests_total", model="llm") + grew("hxc_lm_deadline_misses_total", model="llm") >= 1
    assert metric(after, "hxc_num_requests_running", model="llm") == 0 and metric(after, "hxc_num_requests_waiting", model="llm") == 0
    assert metric(after, "hxc_kv_cache_usage_ratio", model="llm") == 0


# --- while sequences run (a slow device) -------------------------------------------------------------


def _open_stream(s: Server, doc: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=WAIT)
    conn.request("POST", "/v1/completions", json.dumps({"model": "llm", "stream": True, **doc}).encode(),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    return conn, conn.getresponse()


def test_a_client_that_disconnects_frees_its_slot_at_once(slow):
    conn, r = _open_stream(slow, {"prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0, "ignore_eos": True})
    assert r.status == 200
    r.readline()  # the first event: the sequence is running
    wait_for(slow, "hxc_num_requests_running", 1, model="llm")
    t0 = time.monotonic()
    conn.sock.shutdown(2)
    conn.close()
    wait_for(slow, "hxc_num_requests_running", 0, model="llm")
    # 80 tokens take > 2 s at 25 ms a step: the slot was freed long before the end.
    assert time.monotonic() - t0 < 1.0
    wait_for(slow, "hxc_lm_requests_total", 1, endpoint="completions", status="client_gone")


def test_kv_budget_preempts_and_resumes_without_repeating_a_token(slow, model):
    """Two sequences start (their prompts fit the ~100-token budget), outgrow it
    together, and the younger is preempted, then resumed by prefilling what it had:
    both texts are still generate's, and nothing streamed is sent twice."""
    c = client(slow)
    jobs = [(PROMPTS[0], 60), (PROMPTS[1], 60)]
    wants = [reference(model, p, n, stop_token_ids=[]).text for p, n in jobs]

    def one(job) -> str:
        chunks = c.completions.create(model="llm", prompt=job[0], max_tokens=job[1], temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})  # fmt: skip
        return "".join(ch.choices[0].text for ch in chunks)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(one, jobs[0])
        wait_for(slow, "hxc_num_requests_running", 1, model="llm")
        got = [first, pool.submit(one, jobs[1])]
        got = [f.result(WAIT) for f in got]
    assert got == wants
    assert metric(slow.metrics({"api-key": KEY}), "hxc_preemptions_total", model="llm") >= 1


def test_beyond_max_queue_is_503_with_retry_after_and_beyond_max_streams_too(slow):
    # A long prompt takes most of the KV budget: the next two wait, the one after is refused.
    doc = {"prompt": list(range(2, 80)), "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    streams = [_open_stream(slow, doc)]
    wait_for(slow, "hxc_num_requests_running", 1, model="llm")
    streams += [_open_stream(slow, doc), _open_stream(slow, doc)]
    wait_for(slow, "hxc_num_requests_waiting", 2, model="llm")
    status, hdrs, reply = post(slow, "/v1/completions", {"model": "llm", "prompt": "x", "max_tokens": 2})
    assert status == 503 and int(hdrs["Retry-After"]) >= 1 and reply["error"]["code"] == "overloaded"
    assert "waiting" in reply["error"]["message"]
    status, hdrs, reply = post(slow, "/v2/models/llm/generate_stream", {"text_input": "x"})  # a fourth stream
    assert status == 503 and "--max-streams" in reply["error"] and int(hdrs["Retry-After"]) >= 1
    for conn, r in streams:  # the three finish, one after the other
        parts = events(r.read())
        conn.close()
        assert parts[-1] == "[DONE]" and parts[-2]["choices"][0]["finish_reason"] == "length"
    assert metric(slow.metrics({"api-key": KEY}), "hxc_num_requests_waiting", model="llm") == 0


def test_a_worker_killed_mid_generation_is_resumed_and_its_text_stands(slow, model):
    """The worker's process is SIGKILLed while a stream runs: the sequence is prefilled
    again (prompt + the tokens already sent) on the restarted worker and finishes;
    the client's text is generate's, no token sent twice."""
    want = reference(model, PROMPTS[2], 50, stop_token_ids=[])
    conn, r = _open_stream(slow, {"prompt": PROMPTS[2], "max_tokens": 50, "temperature": 0, "ignore_eos": True})
    lines = [r.readline() for _ in range(12)]  # a few events in
    os.kill(slow.workers()["cpu:host"], signal.SIGKILL)
    parts = events(b"".join(lines) + r.read())
    conn.close()
    assert parts[-1] == "[DONE]" and parts[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(p["choices"][0]["text"] for p in parts[:-1]) == want.text
    assert metric(slow.metrics({"api-key": KEY}), "hxc_device_restarts_total", model="llm") == 1


def test_sigterm_drains_streams_in_flight_then_exits(slow):
    streams = [_open_stream(slow, {"prompt": p, "max_tokens": 30, "temperature": 0, "ignore_eos": True}) for p in PROMPTS[:2]]
    for _, r in streams:
        r.readline()
    slow.process.send_signal(signal.SIGTERM)
    for conn, r in streams:
        parts = events(r.read())
        conn.close()
        assert parts[-1] == "[DONE]" and parts[-2]["choices"][0]["finish_reason"] == "length"
        assert len([p for p in parts[:-2] if p["choices"][0]["text"]]) > 10
    assert slow.process.wait(WAIT) == 0 and not slow.workers()


# --- lavapipe (heavy: its own build and server) -------------------------------------------------------


@pytest.mark.heavy
def test_lavapipe_streams_what_the_cpu_generates(tiny_llm_bundle, model):
    vulkan = tiny_llm_bundle
    want = reference(model, PROMPTS[1], 16)
    with Server(f"llm={vulkan}", "--devices", "vulkan", env={"HXC_API_KEY": KEY}) as s:
        c = client(s)
        chunks = c.completions.create(model="llm", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in chunks) == want.text
        assert c.completions.create(model="llm", prompt=PROMPTS[1], max_tokens=16, temperature=0).choices[0].text == want.text
