"""What a run kept of what the base knew, the chat regime and replay: the probes, the data and a minimal run."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from benchmarks import chat_task, kept_probe, kept_report, noisy_sft, real_sft, replay
from benchmarks.real_task import ChatSample, ChatTask


def _sample(tag: int) -> ChatSample:
    return ChatSample([1, tag], [tag, 2], [False, False])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return real_sft.tiny_model(tmp_path_factory.mktemp("kept") / "tiny-llama")


def test_a_probe_answer_is_right_when_the_reply_mentions_one_accepted_answer():
    assert kept_probe.mentions("The capital of France is Paris.", "Paris")
    assert kept_probe.mentions("He was a brilliant Physicist.", "physicist|scientist")
    assert not kept_probe.mentions("Dunholt is the capital of France.", "Paris")
    assert len({kind for kind, _, _ in kept_probe.PROBES}) >= 5  # several kinds of fact and skill


def test_chat_regime_holds_out_conversations_and_fits_its_token_budget(tiny_folder):
    _, tokenizer = real_sft.load(tiny_folder)
    task = chat_task.ChatConversationsTask(tokenizer)
    held = task.held_out("chat", 20)
    train = task.make("chat", 30, 0.0, random.Random(0), task.held_out_keys(held))
    assert len(held) == 20 and len(train) == 30 and not task.CHECKABLE
    assert {s.words for s in held}.isdisjoint({s.words for s in train})
    for s in train:
        assert len(s.response) <= chat_task.MAX_TOKENS + 1 and s.response[-1] == task.end_id and not any(s.corrupted)
    other = task.make("chat", 30, 0.0, random.Random(1))
    assert [s.words for s in other] != [s.words for s in train]  # drawn per seed
    lo, hi = kept_probe.DRIFT_CONVERSATIONS
    assert chat_task.HELD_OUT_CONVERSATIONS[1] <= replay.REPLAY_CONVERSATIONS[0] < replay.REPLAY_CONVERSATIONS[1] <= lo
    assert chat_task.TRAIN_CONVERSATIONS[1] <= chat_task.HELD_OUT_CONVERSATIONS[0] and hi <= len(
        chat_task.conversations()
    )


def test_replay_swaps_a_share_of_the_samples_for_distinct_base_replies():
    samples, pool = [_sample(i) for i in range(20)], [_sample(100 + i) for i in range(10)]
    mixed = replay.with_replay(samples, pool, 0.25, random.Random(3))
    swapped = [i for i, (a, b) in enumerate(zip(samples, mixed, strict=True)) if a is not b]
    assert len(mixed) == 20 and len(swapped) == 5
    assert len({id(mixed[i]) for i in swapped}) == 5 and all(mixed[i] in pool for i in swapped)
    assert replay.with_replay(samples, pool, 0.0, random.Random(3)) == samples
    with pytest.raises(ValueError, match="must be in"):
        replay.with_replay(samples, pool, 1.0, random.Random(3))
    with pytest.raises(ValueError, match="base replies"):
        replay.with_replay(samples, pool[:2], 0.5, random.Random(3))


def test_replay_added_keeps_every_sample_and_grows_the_batch_by_its_share():
    samples, pool = [_sample(i) for i in range(20)], [_sample(100 + i) for i in range(3)]
    mixed = replay.with_replay_added(samples, pool, 0.25, random.Random(3))
    assert mixed[:20] == samples and len(mixed) == 25 and all(m in pool for m in mixed[20:])
    assert len({id(m) for m in mixed[20:23]}) == 3  # every reply once before any repeats
    with pytest.raises(ValueError, match="must be > 0"):
        replay.with_replay_added(samples, pool, 0.0, random.Random(3))
    method = real_sft.METHODS["recommended_replay_added"]
    assert method.batch(8) == 10 and real_sft.METHODS["full_replay_added_half"].batch(8) == 12
    assert real_sft.METHODS["recommended"].batch(8) == 8
    args = real_sft.parse_args(["--lora-r", "64", "--lora-alpha", "16"])
    assert noisy_sft.lora(args).lora_alpha == 16 and noisy_sft.lora(real_sft.parse_args([])).lora_alpha == 32


def test_probe_is_built_once_per_base_and_scores_the_base_replies(tmp_path, tiny_folder):
    model, tokenizer = real_sft.load(tiny_folder)
    calls = []

    def make(model, value):
        calls.append(value)
        return {"value": value}

    first = kept_probe.cached(tmp_path, "probe", model, [1], make, 7)
    again = kept_probe.cached(tmp_path, "probe", model, [1], make, 8)
    other = kept_probe.cached(tmp_path, "probe", model, [2], make, 9)
    assert calls == [7, 9] and first == again and first["value"] == 7 and other["value"] == 9
    task = ChatTask(tokenizer)
    replies = kept_probe.greedy_token_replies(model, tokenizer, task, ["hello there", "how are you?"], 5)
    assert all(1 <= len(r) <= 5 and (r[-1] == task.end_id or len(r) == 5) for r in replies)
    drawn = [kept_probe.greedy_token_replies(model, tokenizer, task, ["hello there"] * 3, 5, 7) for _ in range(2)]
    assert drawn[0] == drawn[1] and len({tuple(r) for r in drawn[0]}) > 1  # reproducible draws, not the greedy one
    samples = kept_probe.replies_as_samples(task, ["hello there", "how are you?"], replies)
    assert [s.response for s in samples] == replies and samples[0].prompt == task.prompt_ids("hello there")


def test_real_sft_reports_learned_and_kept_in_the_chat_and_facts_regimes(tmp_path, tiny_folder):
    out, runs = tmp_path / "real.json", tmp_path / "runs"
    runs.mkdir()
    (runs / "tiny-llama").symlink_to(tiny_folder)
    argv = ["--tiny", "--steps", "2", "--batch", "4", "--eval", "6", "--runs-dir", str(runs), "--out", str(out)]
    real_sft.main([*argv, "--regimes", "chat,new_facts", "--methods", "recommended_replay_added"])
    report = json.loads(out.read_text())
    for regime in ("chat", "new_facts"):
        part = report["regimes"][regime]
        row = part["methods"]["recommended_replay_added"]["seeds"]["0"]
        for result in (row, part["base"]):
            assert result["chat_drift"] > 0 and ("accuracy" in result) == (regime == "new_facts")
        assert row["total_train_seconds"] > row["train_seconds"]  # the base replies' generation counted
        assert row["chat_drift"] != part["base"]["chat_drift"]  # scored under the fine-tuned model
    table = kept_report.kept_table(report)
    assert table.count("| chat |") == table.count("| new_facts |") == 2  # the base and the method
    other = {**report, "settings": {**report["settings"], "lr": 1e-4, "train": 99}}
    both = kept_report.merged([report, other])
    assert list(both["regimes"]["chat"]["methods"]) == [
        "recommended_replay_added",
        "recommended_replay_added lr=0.0001",
    ]
    assert list(report["regimes"]["chat"]["methods"]) == ["recommended_replay_added"]  # the first file untouched
    if importlib.util.find_spec("matplotlib"):
        kept_report.plot(both, tmp_path / "kept.png")
        assert (tmp_path / "kept.png").stat().st_size > 0


def test_the_plot_axis_ends_past_the_methods_that_beat_the_base():
    end = kept_report.axis_end([0.8, 1.5, 12.2], base_loss=7.8)  # 12.2: learned less than the base knew
    assert 1.5 < end < 2.0
    assert kept_report.axis_end([0.8, 1.5, 12.2], base_loss=None) > 12.2
    assert kept_report.axis_end([9.0, 12.2], base_loss=7.8) > 12.2  # none beat the base: every point on the axis


def test_the_kept_tables_name_the_seeds_in_order_and_close_gaps_on_the_seeds_shared(tmp_path, capsys):
    run = {"clean_loss": 1.0, "knowledge_kept": 0.5, "chat_drift": 1.2, "optimizer_steps": 40}
    seeds = {"1": dict(run, clean_loss=0.8), "0": run, "2": {"clean_loss": 0.1}}  # seed 2 reports nothing kept
    report = {"regimes": {"chat": {"base": {}, "methods": {"full": {"seeds": seeds}}}}}
    [row] = kept_report.kept_rows(report)
    assert row[:4] == ["chat", "full", "0,1", "-"] and row[4] == "0.900 ± 0.141"
    report["regimes"]["chat"]["base"] = {"clean_loss": 4.5, "knowledge_kept": 1.0, "chat_drift": 0.9}
    one = {"seeds": {"0": dict(run, knowledge_kept=0.25)}}
    report["regimes"]["chat"]["methods"]["recommended"] = one
    summary = kept_report.summary_table(report, ["recommended", "full", "dft"])  # dft ran nowhere: no column
    assert summary.splitlines()[0] == "| regime | base | recommended | full |"
    assert summary.splitlines()[2] == "| chat | 4.500 / 100% | 1.000 / 25% (1 seed) | 0.900 / 50% |"
    assert kept_report.gaps_closed(report, ["recommended"]) == []  # no oracle: no gap to close
    report["regimes"]["chat"]["methods"]["oracle"] = {"seeds": {"0": dict(run, clean_loss=0.4)}}
    one["seeds"]["0"]["clean_loss"] = 0.7  # seed 0, the one the three share: full 1.0, oracle 0.4
    assert kept_report.gaps_closed(report, ["recommended"]) == ["chat: recommended 50% (seeds 0)"]
    report["settings"] = {"lr": 5e-4}
    (tmp_path / "r.json").write_text(json.dumps(report))
    kept_report.main(["--summary", str(tmp_path / "r.json"), "--methods", "oracle,recommended"])
    printed = capsys.readouterr().out
    assert "| regime | base | oracle | recommended |" in printed and "chat: recommended 50% (seeds 0)" in printed


def test_the_bar_compares_a_method_with_full_sft_on_the_seeds_both_ran(tmp_path, capsys):
    def run(loss, kept, accuracy=None):
        row = {"clean_loss": loss, "knowledge_kept": kept, "chat_drift": 1.0, "optimizer_steps": 40}
        return row if accuracy is None else {**row, "accuracy": accuracy}

    chat = {  # full keeps under half: the bar asks twice its share; seed 1 is full SFT's alone
        "full": {"seeds": {"0": run(3.6, 0.4), "1": run(9.0, 0.9)}},
        "cand": {"seeds": {"0": run(3.6004, 0.8)}},  # level with full SFT: 0.0004 is below LEVEL, the precision shown
    }
    wrong = {  # answers are noisy: 60% of full SFT's gap to the oracle (0.2 to 0.1) must close
        "full": {"seeds": {"0": run(0.2, 0.6, 0.8)}},
        "oracle": {"seeds": {"0": run(0.1, 0.6, 0.9)}},
        "cand": {"seeds": {"0": run(0.15, 0.5, 0.85)}},
    }
    report = {"regimes": {"chat": {"methods": chat}, "wrong": {"methods": wrong}, "sums": {"methods": {}}}}
    rows = {r[0]: r for r in kept_report.bar_rows(report, "cand")}
    assert list(rows) == ["chat", "wrong"]  # sums: neither ran
    assert rows["chat"][1:] == ["0", "3.600 / 3.600", "-", "80% / 40% (2.00x)", "-", "meets"]
    assert rows["wrong"][5:] == ["50%", "keeps less; closes under 60% of the gap"]
    chat["cand"]["seeds"]["0"] = run(3.61, 0.79)
    assert kept_report.bar_rows(report, "cand")[0][-1] == "learns less (answer loss); keeps under 2 times"
    wrong["cand"]["seeds"]["0"] = run(0.14, 0.6, 0.7)  # 60% closed, the same kept, fewer exact matches
    assert kept_report.bar_rows(report, "cand")[1][5:] == ["60%", "learns less (exact match)"]
    report["settings"] = {"lr": 5e-4}
    (tmp_path / "r.json").write_text(json.dumps(report))
    kept_report.main(["--bar", "cand", str(tmp_path / "r.json")])
    assert "| wrong | 0 | 0.140 / 0.200 | 0.700 / 0.800 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="shares no seed with full SFT"):
        kept_report.main(["--bar", "nothing", str(tmp_path / "r.json")])


def test_general_rows_are_real_exchanges_no_regime_uses_and_the_anchor_on_them_trains(tmp_path, tiny_folder):
    _, tokenizer = real_sft.load(tiny_folder)
    rows = replay.general_rows(tokenizer)
    task = chat_task.ChatConversationsTask(tokenizer)
    assert len(rows) > 500 and all(r[-1] == task.end_id for r in rows)  # each a whole exchange, its end token last
    lo, hi = chat_task.HELD_OUT_CONVERSATIONS  # the chat regime's held-out replies: none is anchored
    held = {tuple(task.exchange(*p).input_ids) for c in chat_task.conversations()[lo:hi] for p in c}
    assert held.isdisjoint(map(tuple, rows))
    out, runs = tmp_path / "real.json", tmp_path / "runs"
    runs.mkdir()
    (runs / "tiny-llama").symlink_to(tiny_folder)
    argv = ["--tiny", "--steps", "2", "--batch", "4", "--eval", "6", "--runs-dir", str(runs), "--out", str(out)]
    real_sft.main([*argv, "--regimes", "new_facts", "--methods", "recommended,recommended_anchor_general"])
    methods = json.loads(out.read_text())["regimes"]["new_facts"]["methods"]
    plain, anchored = (methods[m]["seeds"]["0"] for m in ("recommended", "recommended_anchor_general"))
    assert anchored["chat_drift"] > 0 and anchored["clean_loss"] != plain["clean_loss"]  # the term moved training
