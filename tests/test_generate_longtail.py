"""Per-request refill: with more prompts than the engine's window, a finished request leaves the
engine and a queued one enters at once, so one long request never holds the others' slots; and
commit batches group finished prompts by count, whatever was sent together.

Request lengths here are set by the prompt's length: with EOS ignored a request generates up to
the model's context (``max_tokens`` is capped at ``max_model_len`` less the prompt), so a short
prompt makes a long request and a long prompt a short one. The assertions read the order of the
engine actor's own enter/leave events, never the clock."""
import pytest

from stages.common.engine import EngineSpec, SamplingSpec

MAX_LEN = 128


def _rows() -> list[dict]:
    long_prompt = "Compute " + " + ".join(str(i) for i in range(26)) + "."  # many tokens: a short request
    rows = [{"prompt_id": "slow", "prompt": "Compute 1 + 1."}]  # few tokens: the long request
    rows += [{"prompt_id": f"fast{i}", "prompt": long_prompt.replace("Compute", f"Compute {i} then")} for i in range(15)]
    return rows


def test_window_defaults_to_chunks_and_is_overridable():
    assert EngineSpec(batch_size=32, chunks_in_flight=8).window() == 256
    assert EngineSpec(batch_size=32, max_inflight=512).window() == 512


@pytest.mark.engine
def test_a_new_request_enters_before_the_slowest_of_the_first_commit_batch_finishes(ray_local, tiny_model):
    import ray

    from stages.common.engine import open_engines

    window = 4
    # the window is the client's max_inflight; the engine's own settings are those of the other
    # tiny-model tests, so the engine they keep serves here too (each start costs ~30 s)
    spec = EngineSpec(max_model_len=MAX_LEN, kv_cache_gb=0.25, max_inflight=window, batch_size=4,
                      commit_seconds=3600)
    rows = _rows()
    sampling = SamplingSpec(n=1, max_tokens=MAX_LEN, ignore_eos=True, seed=3)
    with open_engines(tiny_model, spec) as pool:
        earlier = ray.get(pool.actors[0].events.remote())  # a kept engine's log holds earlier tests' units
        since = earlier[-1][0] + 1 if earlier else 0
        batches = list(pool.generate(iter(rows), sampling, keep=("prompt",)))
        events = ray.get(pool.actors[0].events.remote(since))
    out = [r for b in batches for r in b]
    assert sorted(r["prompt_id"] for r in out) == sorted(r["prompt_id"] for r in rows)  # each prompt once
    assert all(r["prompt"] == next(x["prompt"] for x in rows if x["prompt_id"] == r["prompt_id"]) for r in out)
    tokens = {r["prompt_id"]: r["completion_tokens"] for r in out}
    assert tokens["slow"] > 2 * max(v for k, v in tokens.items() if k != "slow")  # the test's premise: one long tail
    assert [len(b) for b in batches] == [4, 4, 4, 4]  # commit batches by count, not by what was sent together

    enter = {pid: seq for seq, kind, _, pid in events if kind == "enter"}
    leave = {pid: seq for seq, kind, _, pid in events if kind == "leave"}
    assert set(enter) == set(leave) == set(tokens)
    first_window = sorted(enter, key=enter.get)[:window]
    assert "slow" in first_window
    # the first commit batch: the first four prompts to finish, none of them the slow one
    first_batch = {r["prompt_id"] for r in batches[0]}
    assert "slow" not in first_batch
    slowest_of_first_batch = max(first_batch, key=leave.get)
    newcomers = [pid for pid in enter if pid not in first_window]
    assert any(enter[pid] < leave[slowest_of_first_batch] for pid in newcomers)
    # refill per request: prompts sent after the first window entered *and finished* while the
    # slow request of that window was still generating (a chunk would have held their slots)
    assert sum(leave[pid] < leave["slow"] for pid in newcomers) >= window
    # never more than the window in the engine at once
    running = peak = 0
    for _, kind, _, _ in sorted(events):
        running += 1 if kind == "enter" else -1
        peak = max(peak, running)
    assert peak == window
