"""The benchmark scripts run end to end at a minimal size and write the fields the README reads (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
import torch

from benchmarks import forgetting_loop, noise_probe, noisy_report, noisy_sft, real_sft, real_task, step_cost
from benchmarks.knowledge_task import FactsTask, SumsTask, residents
from benchmarks.noisy_report import compute_table, plain_partner
from benchmarks.real_report import method_table, versus_table
from benchmarks.real_task import ReversalTask


def test_step_cost_writes_every_variant(tmp_path):
    out = tmp_path / "step_cost.json"
    argv = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "48", "--prompt-len", "16"]
    step_cost.main([*argv, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["machine"]["cpu_count"]
    variants = report["variants"]
    names = ["sft", "online", "cached", "output_attentions", "recommended", "recommended_anchor"]
    assert list(variants) == [*names, "recommended_anchor_prompt", "recommended_anchor_general"]
    for row in variants.values():
        assert "error" not in row and row["steps"] == 2
        for key in ("step_s", "time_ratio", "peak_bytes", "peak_ratio", "step_extra_bytes", "score_s", "collate_s"):
            assert key in row
    assert variants["sft"]["time_ratio"]["median"] == 1.0
    assert variants["online"]["score_s"] > 0 and variants["online"]["history_s"] > 0
    assert variants["cached"]["score_s"] > 0 and variants["output_attentions"]["score_s"] > 0
    assert variants["sft"]["score_s"] == 0
    assert variants["recommended"]["score_s"] == 0 and variants["recommended"]["history_s"] == 0  # neither runs


MINIMAL = ["--seeds", "0", "--train", "48", "--steps", "5", "--base-steps", "4", "--ref-steps", "2", "--eval", "12"]


@pytest.mark.parametrize("regime", noisy_sft.REGIMES)
def test_noisy_sft_reports_quality_and_drops(tmp_path, regime):
    out = tmp_path / "noisy.json"
    methods = [
        "full",
        "full_x2",
        "rho1",
        "token_cleaning_self",
        "recommended_one_run",
        "sstoken_g0.5",
        "loss_truncation_self",
        "recommended",
        "oracle_after_0.5",
        noisy_sft.ORACLE,
    ]
    noisy_sft.main([*MINIMAL, "--regimes", regime, "--methods", ",".join(methods), "--batch", "8", "--out", str(out)])
    report = json.loads(out.read_text())
    assert list(report["regimes"]) == [regime]
    part = report["regimes"][regime]
    assert list(part["methods"]) == methods
    for name, result in part["methods"].items():
        assert len(result["seeds"]) == 1
        summary = result["summary"]
        assert 0 <= summary["accuracy"]["mean"] <= 1 and summary["clean_loss"]["mean"] > 0
        assert 0 <= summary["corrupted_dropped_share"]["mean"] <= 1
        # these may drop nothing in 5 steps: no selection, a reference that fits the data, or a warm-up
        if name not in ("full", "full_x2", "loss_truncation_self", "recommended", "oracle_after_0.5", noisy_sft.ORACLE):
            assert summary["clean_dropped_share"]["mean"] + summary["corrupted_dropped_share"]["mean"] > 0
    methods = part["methods"]
    assert methods["full"]["summary"]["corrupted_dropped_share"]["mean"] == 0
    assert methods["loss_truncation_self"]["summary"]["eos_dropped_share"]["mean"] == 0  # the response end is protected
    assert methods["recommended_one_run"]["summary"]["eos_dropped_share"]["mean"] == 0
    assert methods["recommended"]["summary"]["eos_dropped_share"]["mean"] == 0
    assert methods[noisy_sft.ORACLE]["summary"]["corrupted_dropped_share"]["mean"] == 1  # masked, never trained
    late = methods["oracle_after_0.5"]["summary"]  # masked from step 3 of 5 on: some batches of every kind
    assert 0 < late["corrupted_dropped_share"]["mean"] < 1 and late["clean_dropped_share"]["mean"] == 0
    assert 0 < part["corrupted_share_of_response_tokens"] < 1
    steps = {name: m["summary"]["optimizer_steps"]["mean"] for name, m in methods.items()}
    assert steps["full"] == 5 and steps["full_x2"] == 10 and steps["loss_truncation_self"] == 10  # run 1 counted
    assert steps["token_cleaning_self"] == 10 and steps["rho1"] == 5 + 2  # its clean reference's 2 steps
    partners = {name: plain_partner(methods, name) for name in methods}
    assert partners["loss_truncation_self"] == partners["rho1"] == partners["token_cleaning_self"] == "full_x2"
    assert partners["sstoken_g0.5"] == partners[noisy_sft.ORACLE] == "full"
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0


def test_noisy_sft_help_documents_every_regime(capsys):
    with pytest.raises(SystemExit):
        noisy_sft.parse_args(["--help"])
    text = capsys.readouterr().out
    for regime in noisy_sft.REGIMES:
        assert f"  {regime} " in text


def test_noisy_sft_refuses_unknown_regimes_and_methods(capsys):
    for argv in (["--regimes", "noisy"], ["--methods", "full,magic"]):
        with pytest.raises(SystemExit):
            noisy_sft.parse_args(argv)
        assert "unknown" in capsys.readouterr().err


def test_noise_probe_auroc_matches_a_pairwise_count():
    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 6, (40,), generator=gen).float()  # many ties
    positive = torch.rand(40, generator=gen) < 0.3
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in score[positive] for n in score[~positive]]
    assert noise_probe.auroc(score, positive) == pytest.approx(sum(pairs) / len(pairs))


def test_noise_probe_reports_every_signal_at_every_share(tmp_path):
    out = tmp_path / "probe.json"
    argv = [*MINIMAL, "--batch", "8", "--probe", "16", "--at", "0.4", "1.0", "--out", str(out)]
    noise_probe.main(argv)
    report = json.loads(out.read_text())
    assert list(report["regimes"]) == list(noise_probe.CORRUPTED_REGIMES)
    for runs in report["regimes"].values():
        assert len(runs) == 1 and list(runs[0]) == ["0.4", "1"]
        for values in runs[0].values():
            assert set(values) == set(noise_probe.SIGNALS) and all(0 <= v <= 1 for v in values.values())


def test_noise_probe_refuses_the_regime_without_corrupted_tokens():
    with pytest.raises(SystemExit):
        noise_probe.parse_args(["--regimes", "redundant"])


# --- the real-model benchmark: the task on SmolLM2's tokenizer, the loader, and the whole run on a tiny model ---


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random LLaMA with SmolLM2's own tokenizer, through the benchmark's --tiny path."""
    return real_sft.tiny_model(tmp_path_factory.mktemp("real") / "tiny-llama")


def test_real_task_flags_exactly_the_noise(tiny_folder):
    _, tokenizer = real_sft.load(tiny_folder)
    task = ReversalTask(tokenizer)
    for regime in task.REGIMES:
        samples = task.make(regime, 60, 0.3, random.Random(1))
        for s in samples:
            assert s.response[-1] == task.end_id and not s.corrupted[-1]
            text = tokenizer.decode(s.response[:-1])
            answer = real_task.answer_text(text, filler=regime == "redundant")
            words = answer.rstrip(".").split(", ")
            clean = list(reversed(s.words))
            flagged = "".join(tokenizer.decode([t]) for t, bad in zip(s.response, s.corrupted, strict=True) if bad)
            if regime in ("clean", "corrupted"):
                assert text == answer and len(words) == len(clean)
                wrong = [w for w, c in zip(words, clean, strict=True) if w != c]
                assert flagged.replace(" ", "") == "".join(wrong)  # the substituted words' tokens, nothing else
                assert not set(wrong) & set(s.words)
            elif regime == "wrong":
                assert (words != clean) == any(s.corrupted)
                assert flagged.replace(" ", "") == ("".join(words) if words != clean else "")
            else:
                assert words == clean and text.startswith(tuple(real_task.OPENINGS))
                scored = tokenizer.decode([t for t, a in zip(s.response, s.answer, strict=True) if a])
                assert scored.strip() == real_task.reversed_answer(s.words)
                assert flagged.replace(" ", "") == text.replace(answer, "").replace(" ", "")  # opening, closing
        share = sum(any(s.corrupted) for s in samples) / len(samples)
        if regime == "clean":
            assert share == 0
        elif regime == "wrong":
            assert 0.1 < share < 0.5
        else:
            assert share > 0.5  # corrupted: 3-5 words at 30% each; redundant: every response has filler


def test_new_facts_ask_each_resident_in_every_form_and_flag_exactly_the_wrong_towns(tiny_folder):
    _, tokenizer = real_sft.load(tiny_folder)
    task, world = FactsTask(tokenizer), dict(residents())
    assert len(set(world.values())) == len(world)  # every town names one resident
    for regime in task.REGIMES:
        samples = task.make(regime, 5 * len(world), 0.3, random.Random(1))
        asked = {}
        for s in samples:
            (name,) = s.words
            text = tokenizer.decode(s.response[:-1])
            town = tokenizer.decode([t for t, c in zip(s.response, s.content, strict=True) if c]).strip()
            flagged = tokenizer.decode([t for t, bad in zip(s.response, s.corrupted, strict=True) if bad]).strip()
            assert town in text and name in tokenizer.decode(s.prompt) and s.expected == world[name]
            assert flagged == ("" if town == world[name] else town)  # the wrong town's tokens, nothing else
            assert town in world.values()
            asked.setdefault(name, set()).add(tokenizer.decode(s.prompt))
        assert all(len(prompts) == 5 for prompts in asked.values())  # five question forms per resident
        wrong = sum(any(s.corrupted) for s in samples) / len(samples)
        assert wrong == 0 if regime == "new_facts" else 0.15 < wrong < 0.45
    held = task.held_out("new_facts", 80)
    assert sorted(s.words[0] for s in held) == sorted([*world] * 2)  # every resident, in two forms never trained on
    trained = {tokenizer.decode(s.prompt) for s in task.make("new_facts", 5 * len(world), 0.0, random.Random(0))}
    assert not trained & {tokenizer.decode(s.prompt) for s in held}
    for s in held:
        scored = tokenizer.decode([t for t, a in zip(s.response, s.answer, strict=True) if a]).strip()
        assert scored == s.expected and real_task.is_correct(f"I think {s.expected}.", s)
        assert not real_task.is_correct("I do not know.", s)


def test_sums_flag_exactly_the_wrong_sums_and_hold_out_their_pairs(tiny_folder):
    _, tokenizer = real_sft.load(tiny_folder)
    task = SumsTask(tokenizer)
    held = task.held_out("sums", 40)
    avoid = task.held_out_keys(held)
    for regime in task.REGIMES:
        samples = task.make(regime, 200, 0.3, random.Random(1), avoid)
        for s in samples:
            a, b = map(int, s.words)
            text = tokenizer.decode(s.response[:-1])
            said = tokenizer.decode([t for t, c in zip(s.response, s.content, strict=True) if c])
            assert text == f"{a} + {b} = {said}." and s.expected == str(a + b) and s.words not in avoid
            flagged = tokenizer.decode([t for t, bad in zip(s.response, s.corrupted, strict=True) if bad])
            right = len(os.path.commonprefix([said, str(a + b)]))
            assert flagged == said[right:] and (flagged != "") == (int(said) != a + b)  # from the first wrong digit
            assert int(said) == a + b or 1 <= abs(int(said) - a - b) <= 10
        wrong = sum(any(s.corrupted) for s in samples) / len(samples)
        assert wrong == 0 if regime == "sums" else 0.15 < wrong < 0.45
    for s in held:
        scored = tokenizer.decode([t for t, a in zip(s.response, s.answer, strict=True) if a])
        assert scored == s.expected and real_task.is_correct(f"It is {s.expected}.", s)
        assert not real_task.is_correct(f"{s.words[0]} + {s.words[1]} = {int(s.expected) + 1}.", s)


def test_real_task_loss_and_replies_match_a_plain_loop(tiny_folder):
    model, tokenizer = real_sft.load(tiny_folder)
    task = ReversalTask(tokenizer)
    samples = task.make("redundant", 4, 0.0, random.Random(2))
    nll, count = 0.0, 0
    for s in samples:  # one unpadded sample at a time
        logits = model(input_ids=torch.tensor([s.input_ids])).logits[0].float()
        for i, (token, scored) in enumerate(zip(s.response, s.answer, strict=True)):
            if scored:
                nll -= torch.log_softmax(logits[len(s.prompt) + i - 1], -1)[token].item()
                count += 1
    assert real_task.clean_loss(model, samples, tokenizer.pad_token_id, batch_size=3) == pytest.approx(nll / count)
    replies = real_task.greedy_replies(model, tokenizer, samples, batch_size=3)
    new = max(len(s.response) for s in samples) + 4
    for s, reply in zip(samples, replies, strict=True):  # unpadded greedy decoding, one sample at a time
        ids = list(s.prompt)
        while len(ids) - len(s.prompt) < new:
            nxt = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
            if nxt == task.end_id:
                break
            ids.append(nxt)
        assert reply == tokenizer.decode(ids[len(s.prompt) :], skip_special_tokens=True)


def test_real_sft_runs_merges_and_reuses_run_1(tmp_path, tiny_folder):
    out, runs = tmp_path / "real.json", tmp_path / "runs"
    runs.mkdir()
    (runs / "tiny-llama").symlink_to(tiny_folder)
    argv = ["--tiny", "--steps", "3", "--batch", "4", "--eval", "6", "--regimes", "corrupted", "--runs-dir", str(runs)]
    real_sft.main([*argv, "--methods", "loss_truncation_self,sstoken_g0.5", "--out", str(out)])
    first = json.loads(out.read_text())
    real_sft.main([*argv, "--methods", "full_x2,recommended_one_run", "--out", str(out)])
    report = json.loads(out.read_text())
    methods = report["regimes"]["corrupted"]["methods"]
    assert list(methods) == ["full", "loss_truncation_self", "sstoken_g0.5", "full_x2", "recommended_one_run"]
    assert methods["full"] == first["regimes"]["corrupted"]["methods"]["full"]  # run 1 reused, not retrained
    steps = {name: m["seeds"]["0"]["optimizer_steps"] for name, m in methods.items()}
    assert steps == {"full": 3, "loss_truncation_self": 6, "sstoken_g0.5": 3, "full_x2": 6, "recommended_one_run": 3}
    for name, m in methods.items():
        row = m["seeds"]["0"]
        assert 0 <= row["accuracy"] <= 1 and row["clean_loss"] > 0 and row["train_seconds"] > 0
        assert 0 < row["flagged_share"] < 1
        assert row["total_train_seconds"] >= row["train_seconds"]
        assert plain_partner(methods, name) == ("full_x2" if steps[name] == 6 else "full")
    assert methods["full"]["summary"]["corrupted_dropped_share"]["mean"] == 0
    rec = methods["loss_truncation_self"]["seeds"]["0"]
    assert rec["total_train_seconds"] == pytest.approx(
        rec["train_seconds"] + methods["full"]["seeds"]["0"]["train_seconds"]
    )
    assert rec["eos_dropped_share"] == 0 and rec["corrupted_dropped_share"] + rec["clean_dropped_share"] > 0
    assert 0 < methods["sstoken_g0.5"]["seeds"]["0"]["clean_dropped_share"] < 1
    with pytest.raises(SystemExit, match="other training settings"):
        real_sft.main([*argv[:2], "4", *argv[3:], "--methods", "full", "--out", str(out)])


def test_real_sft_new_regimes_and_peers_run_and_report_what_they_left_out(tmp_path, tiny_folder):
    out, runs = tmp_path / "real.json", tmp_path / "runs"
    runs.mkdir()
    (runs / "tiny-llama").symlink_to(tiny_folder)
    argv = ["--tiny", "--steps", "4", "--batch", "4", "--eval", "6", "--runs-dir", str(runs), "--out", str(out)]
    methods = "full,dft,entropy_weighted,recommended,oracle"
    real_sft.main([*argv, "--regimes", "new_facts_noisy,sums_noisy", "--methods", methods])
    report = json.loads(out.read_text())
    for regime in ("new_facts_noisy", "sums_noisy"):
        rows = {name: m["seeds"]["0"] for name, m in report["regimes"][regime]["methods"].items()}
        assert set(rows) == set(methods.split(","))  # finished in any order: longest runs first
        for row in rows.values():
            assert 0 <= row["accuracy"] <= 1 and row["clean_loss"] > 0 and row["optimizer_steps"] == 4
            assert 0 <= row["content_dropped_share"] <= 1 and 0 < row["flagged_share"] < 1
        for peer in ("full", "dft", "entropy_weighted"):  # nothing is left out: weighted, never dropped
            assert rows[peer]["corrupted_dropped_share"] == rows[peer]["clean_dropped_share"] == 0
        assert rows["oracle"]["corrupted_dropped_share"] == 1 and rows["oracle"]["clean_dropped_share"] == 0
        assert rows["dft"]["clean_loss"] != rows["full"]["clean_loss"]  # TRL's own DFT loss trained, not plain SFT


def test_forgetting_loop_records_every_step_and_kind(tmp_path, tiny_folder):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "tiny-llama").symlink_to(tiny_folder)
    out = tmp_path / "loop.json"
    argv = ["--tiny", "--steps", "3", "--batch", "4", "--eval", "4", "--runs-dir", str(runs), "--out", str(out)]
    report = forgetting_loop.main([*argv, "--methods", "full,sstoken_g0.5"])
    assert json.loads(out.read_text())["methods"].keys() == {"full", "sstoken_g0.5"}
    for result in report["methods"].values():
        assert len(result["steps"]) == 3 and 0 <= result["accuracy"] <= 1
        for step in result["steps"]:
            assert (
                set(step) == set(forgetting_loop.KINDS) and step["phrase"]["tokens"] > 0 and step["end"]["tokens"] > 0
            )
    dropped = forgetting_loop.per_step(report["methods"]["sstoken_g0.5"], "phrase", "dropped")
    assert all(0 <= d <= 1 for d in dropped) and sum(dropped) > 0  # the paper's quota leaves phrase tokens out
    assert forgetting_loop.per_step(report["methods"]["full"], "phrase", "dropped") == [0.0, 0.0, 0.0]
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0


def test_real_sft_help_documents_every_regime(capsys):
    with pytest.raises(SystemExit):
        real_sft.parse_args(["--help"])
    text = capsys.readouterr().out
    for regime in real_sft.REGIMES:
        assert f"  {regime} " in text
    with pytest.raises(SystemExit):
        real_sft.parse_args(["--methods", "full,magic"])


def test_compute_table_sets_each_method_beside_plain_sft_of_its_steps():
    def entry(steps, accuracy, loss):
        values = dict(optimizer_steps=steps, accuracy=accuracy, clean_loss=loss, train_seconds=1.0)
        return {"summary": {k: {"mean": v, "std": 0.0} for k, v in values.items()}}

    methods = {"full": entry(80, 0.5, 0.4), "full_x2": entry(160, 0.75, 0.25), "two_runs": entry(160, 0.625, 0.5)}
    methods["one_run"] = entry(80, 0.25, 0.375)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in compute_table(methods).splitlines()[2:]}
    assert rows["two_runs"] == ["160", "0.625", "0.500", "+0.125 / +0.100", "full_x2", "-0.125 / +0.250", "1 |"]
    assert rows["one_run"][3:6] == ["-0.250 / -0.025", "full", "-0.250 / -0.025"]


def test_readme_tables_mean_over_seeds_and_judge_the_recommendation_against_each_peer():
    def run(accuracy, loss):
        return {"accuracy": accuracy, "clean_loss": loss}

    seeds = {
        "full": {"0": run(0.5, 0.4), "1": run(0.7, 0.2)},  # mean 0.6 / 0.3
        "dft": {"0": run(0.1, 2.0), "1": run(0.3, 1.0)},  # mean 0.2 / 1.5
        "recommended": {"0": run(0.6, 0.25), "1": run(0.6, 0.45)},  # mean 0.6 / 0.35
        "oracle": {"0": run(0.9, 0.1)},
    }
    report = {"regimes": {"noisy": {"methods": {n: {"seeds": s} for n, s in seeds.items()}}}}
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in method_table(report, ["0", "1"]).splitlines()[2:]
    }
    assert rows["noisy"][:3] == ["0.600 ± 0.141 / 0.300", "0.200 ± 0.141 / 1.500", "0.600 ± 0.000 / 0.350"]
    assert rows["noisy"][3] == "0.900 / 0.100 (seed 0) |"
    row = versus_table(report, ["0", "1"]).splitlines()[2].split(" | ")
    assert row[1] == "+0.000 / +0.050 (worse: loss)" and row[2] == "+0.400 / -1.150 (at least as good) |"
    toy = {"noisy": {"methods": {n: {"summary": noisy_report.summary(list(s.values()))} for n, s in seeds.items()}}}
    lines = noisy_report.summary_tables(toy).splitlines()
    assert (
        lines[2]
        == "| noisy | 0.600 ± 0.141 / 0.300 | 0.200 ± 0.141 / 1.500 | 0.600 ± 0.000 / 0.350 | 0.900 ± 0.000 / 0.100 |"
    )
    assert lines[-1].endswith("(worse: loss) | +0.400 / -1.150 (at least as good) |")
    del seeds["dft"]["1"]  # a peer that ran one seed is compared on that seed only, and says so
    report = {"regimes": {"noisy": {"methods": {n: {"seeds": s} for n, s in seeds.items()}}}}
    assert versus_table(report, ["0", "1"]).splitlines()[2].endswith("+0.500 / -1.750 (at least as good) (seed 0) |")


def test_a_difference_below_the_precision_shown_is_level():
    base = {"accuracy": 0.5, "clean_loss": 0.3}
    assert noisy_report.versus({"accuracy": 0.5, "clean_loss": 0.3004}, base).endswith("(at least as good)")
    assert noisy_report.versus({"accuracy": 0.5, "clean_loss": 0.301}, base).endswith("(worse: loss)")
    assert noisy_report.versus({"accuracy": 0.4875, "clean_loss": 0.29}, base).endswith("(worse: exact match)")
