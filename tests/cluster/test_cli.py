"""The `specserve` command line, run as a user runs it."""

import json
import subprocess
import sys

import pytest

from specserve.cluster.bench_transport import SEGMENTS, hop_breakdown

from .entry import main_here

PROMPT = "def fibonacci(n):"


def specserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specserve.cluster.cli", *args], capture_output=True, text=True,
                          timeout=300)


def generate_json(*flags: str) -> dict:
    proc = specserve("generate", PROMPT, "--json", "--max-tokens", "24", *flags)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def generate_json_here(*flags: str) -> dict:
    """The same through the entry point in this process."""
    status, out, err = main_here("generate", PROMPT, "--json", "--max-tokens", "24", *flags)
    assert status == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def outputs():
    # a fixed draft length and threshold 0: the drafters draft every step whatever the cost model
    # would decide under this machine's load (it may well switch the model drafter off).
    # The model drafter's run is a process of its own, as a user runs it.
    return {"model": generate_json("--drafter", "model", "--threshold", "0", "--fixed-k", "3"),
            "none": generate_json_here("--drafter", "none"),
            "ngram": generate_json_here("--drafter", "ngram", "--threshold", "0", "--fixed-k", "3")}


def test_generate_json_has_the_documented_shape(outputs):
    out = outputs["model"]
    for key in ("prompt_token_ids", "token_ids", "text", "finish_reason", "elapsed_s", "drafted", "accepted",
                "acceptance_rate", "mean_accepted_length", "tokens_per_s"):
        assert key in out
    assert out["prompt_token_ids"] and all(isinstance(t, int) for t in out["prompt_token_ids"])
    assert 0 < len(out["token_ids"]) <= 24
    assert out["finish_reason"] in ("length", "stop")
    assert out["elapsed_s"] > 0
    assert out["accepted"] <= out["drafted"]


def test_generate_greedy_output_is_the_same_with_every_drafter(outputs):
    assert outputs["model"]["token_ids"] == outputs["none"]["token_ids"] == outputs["ngram"]["token_ids"]
    assert outputs["model"]["text"] == outputs["none"]["text"]
    assert outputs["none"]["drafted"] == 0
    assert outputs["model"]["drafted"] > 0


def test_generate_chat_renders_the_messages_with_the_chat_template():
    from specserve.actors.demo import demo_path
    from specserve.actors.engine.build import load_tokenizer

    out = generate_json_here("--chat", "--system", "You write Python.", "--drafter", "none")
    chat = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": PROMPT}]
    want = load_tokenizer(demo_path("target")).apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert out["prompt_token_ids"] == list(want)
    status, _, err = main_here("generate", PROMPT, "--system", "x")
    assert status == 2 and "system" in err


def test_generate_seeded_sampling_is_reproducible():
    a = generate_json_here("--temperature", "0.8", "--top-p", "0.95", "--seed", "3")
    b = generate_json_here("--temperature", "0.8", "--top-p", "0.95", "--seed", "3")
    assert a["token_ids"] == b["token_ids"]


def test_generate_rejects_a_bad_parameter_with_status_2_naming_the_field():
    proc = specserve("generate", PROMPT, "--temperature", "-1")
    assert proc.returncode == 2
    assert "temperature" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag, value, field", [("--top-p", "0", "top_p"), ("--max-tokens", "0", "max_tokens"),
                                                ("--top-k", "-2", "top_k"), ("--fixed-k", "0", "fixed_k")])
def test_generate_rejects_each_bad_parameter_naming_the_field(flag, value, field):
    status, _, err = main_here("generate", PROMPT, flag, value)
    assert status == 2
    assert field in err and "Traceback" not in err


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = specserve("bench", "--prompts", "1", "--max-tokens", "16", "--no-hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "plain-modules", "model", "model-no-lookup", "ngram"}
    assert all(rows[m]["matches_plain"] == 1.0 for m in ("model", "model-no-lookup", "ngram"))
    assert rows["plain"]["speedup"] == 1.0


def test_bench_trees_compares_trees_and_chains_at_the_same_budget(tmp_path):
    out = tmp_path / "trees.json"
    proc = specserve("bench", "--trees", "--prompts", "1", "--max-tokens", "12", "--budgets", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert set(rows) == {"plain", "chain-adaptive", "chain-3", "tree-3", "lookup-tree-3", "ngram-3"}
    assert all(r["matches_plain"] == 1.0 for r in rows.values())  # greedy: every mode is lossless
    assert rows["tree-3"]["verified_per_step"] > 0 and report["tree_vs_chain"][0]["budget"] == 3
    assert report["tree_vs_chain"][0]["lookup_accepted_per_step_ratio"] > 0


def test_bench_suffix_runs_every_drafter_on_repeated_traffic_losslessly(tmp_path):
    out = tmp_path / "suffix.json"
    proc = specserve("bench", "--suffix", "--functions", "2", "--repeats", "2", "--max-tokens", "12", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "suffix / lookup tokens/s" in proc.stdout and "replica B fed by A / B alone tokens/s" in proc.stdout
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "ngram-lookup", "ngram-suffix-own", "ngram-suffix", "model-lookup", "model-suffix-own",
                         "model-suffix", "model-suffix-b"}
    assert all(r["matches_plain"] == 1.0 for r in rows.values())  # greedy: every mode is lossless
    assert rows["ngram-suffix"]["tokens"] == rows["plain"]["tokens"] > 0


def test_bench_transport_times_each_transport_at_each_gap(tmp_path):
    out = tmp_path / "transport.json"
    proc = specserve("bench", "--transport", "--round-trips", "20", "--gaps", "0,1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["transport"], r["gap_ms"]) for r in rows] == [
        (t, g) for t in ("tcp", "grpc-echo", "drafting") for g in (0.0, 1.0)]
    assert all(0 < r["rtt_p50_ms"] <= r["rtt_p90_ms"] for r in rows)
    # the Drafting stream's overhead is its round trip less the drafter's own time
    assert all(0 < r["overhead_p50_ms"] <= r["rtt_p90_ms"] for r in rows if r["transport"] == "drafting")
    assert "rtt50ms" in proc.stdout
    # where the round trip goes: every hop timed, in both processes, and the hops add up to it
    for r in (r for r in rows if r["transport"] == "drafting"):
        hops = r["hops_p50_ms"]
        assert hops["rounds_traced"] >= 15 and all(hops[name] >= 0 for name in SEGMENTS)
        assert 0.5 * r["rtt_p50_ms"] < sum(hops[name] for name in SEGMENTS) < 1.5 * r["rtt_p90_ms"]
    assert "median ms per hop" in proc.stdout


def test_the_hop_breakdown_pairs_each_round_trip_with_the_drafters_marks_inside_it():
    ours, theirs = [], []
    for i, t0 in enumerate((0.0, 1.0, 2.0)):
        ours += [("pool.send", t0), ("grpc.take", t0 + 0.01), ("reader.got", t0 + 0.5), ("engine.woke", t0 + 0.52)]
        theirs += [("loop.read", t0 + 0.1), ("worker.take", t0 + 0.11), ("worker.sent", t0 + 0.2 + 0.1 * i),
                   ("loop.write", t0 + 0.33)]
    theirs.append(("loop.read", 2.3))  # a second read inside the last round: that round is left out
    out = hop_breakdown(ours, theirs, 0.0, 10.0)
    assert out["rounds_traced"] == 2
    assert out["engine to gRPC thread"] == pytest.approx(10.0) and out["reader to engine"] == pytest.approx(20.0)
    assert out["drafting"] == pytest.approx(140.0)  # the median of 90 and 190 ms
    assert hop_breakdown(ours, theirs, 1.5, 10.0)["rounds_traced"] == 0  # outside the window


def test_bench_transport_refuses_a_negative_gap():
    proc = specserve("bench", "--transport", "--gaps", "0,-1")
    assert proc.returncode != 0 and "--gaps" in proc.stderr


def test_bench_kernels_says_it_needs_a_gpu_when_there_is_none():
    proc = specserve("bench", "--kernels")
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr
