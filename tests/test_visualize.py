"""The selection page and summary (from a BatchSelection), and sstoken-inspect end to end against a reference."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from benchmarks.noisy_sft import LOSS_TRUNCATION_TWO_RUNS, RECOMMENDED_ONE_RUN
from sstoken_trl.config import SSTokenConfig
from sstoken_trl.data.collator import SSTokenCollator
from sstoken_trl.integration.selective_forward import BatchSelection
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.selection.selectors import sstoken_select
from sstoken_trl.tools.describe import describe_rule
from sstoken_trl.tools.inspection import run_inspect
from sstoken_trl.tools.tiny import build_model, build_tokenizer
from sstoken_trl.tools.visualize import (
    Token,
    chosen_samples,
    content_note,
    looks_like_content,
    render_html,
    sample_tokens,
    summarize,
)
from tests.conftest import prompt_completion_rows
from tests.reference import prompt_attention, reference_select, token_log_probs


class Page(HTMLParser):
    """Token spans per sample section: (classes, attributes, text)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.samples: list[list[dict]] = []
        self.tags: set[str] = set()
        self._token: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "section":
            self.samples.append([])
        elif tag == "span" and self.samples and "tok" in attrs.get("class", "").split():
            self._token = {"status": attrs["class"].split()[1], "attrs": attrs, "text": ""}
            self.samples[-1].append(self._token)

    def handle_endtag(self, tag):
        if tag == "span":
            self._token = None

    def handle_data(self, data):
        if self._token is not None:
            self._token["text"] += data


def selection_for(tokenizer, texts, rel_rows, attn_rows, config):
    """A BatchSelection built by the core's own selection on the collated texts, with the given REL / AttnScore."""
    batch = SSTokenCollator(tokenizer)([{"text": t} for t in texts])
    layout = batch_layout(batch["labels"], batch["attention_mask"])
    rel, attn = torch.zeros(layout.response.shape), torch.zeros(layout.response.shape)
    for b, (r, a) in enumerate(zip(rel_rows, attn_rows, strict=True)):
        where = layout.response[b].nonzero().squeeze(1)
        assert len(where) == len(r), "test setup: response length"
        rel[b, where], attn[b, where] = torch.tensor(r), torch.tensor(a)
    score, keep, keep_rel = sstoken_select(config, layout, rel, attn, config.gamma)
    selection = BatchSelection(
        batch["input_ids"], batch["labels"], layout.real, layout.doc, layout.response, rel, attn, score, keep, keep_rel
    )
    return selection, batch, keep_rel


TEXTS = ["<|User|>alpha beta<|Assistant|>gamma delta epsilon", "<|User|>alpha<|Assistant|>beta"]
# Four response tokens (three words + EOS), then two. rho 0.5, gamma 0.5: REL alone keeps tokens 0 and 2; the
# combined score keeps 0 and 1 (token 1's attention lifts it), so token 1 is "kept thanks to the attention score".
REL = [[0.9, 0.1, 0.5, 0.0], [0.0, 0.0]]
ATTN = [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0]]
CONFIG = SSTokenConfig(select_ratio=0.5, gamma=0.5)


@pytest.fixture(scope="module")
def words():
    """A tokenizer whose every word of TEXTS is one token."""
    return build_tokenizer(TEXTS * 20, vocab_size=300)


def test_page_marks_kept_attention_and_dropped_tokens(words):
    selection, batch, _ = selection_for(words, TEXTS, REL, ATTN, CONFIG)
    page = Page(render_html(selection, words, CONFIG, title="<demo>"))
    assert len(page.samples) == 2
    first, second = ([t for t in s if t["status"] != "prompt"] for s in page.samples)
    assert [t["status"] for t in first] == ["kept", "attention", "dropped", "dropped"]
    assert [t["status"] for t in second] == ["kept", "dropped"]  # ties go to the earlier token
    assert [float(t["attrs"]["data-rel"]) for t in first] == pytest.approx(REL[0])
    assert [float(t["attrs"]["data-attn"]) for t in first] == pytest.approx(ATTN[0])
    assert float(first[1]["attrs"]["data-score"]) == pytest.approx(0.5 * 0.1 / 0.9 + 0.5)
    assert all("REL" in t["attrs"]["title"] for t in first)
    prompt = [t for t in page.samples[0] if t["status"] == "prompt"]
    assert prompt and all("title" not in t["attrs"] for t in prompt)
    # Every real token is shown once, in order, escaped correctly; padding is not shown.
    for tokens, ids, mask in zip(page.samples, batch["input_ids"], batch["attention_mask"], strict=True):
        expected = words.decode(ids[mask.bool()], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert "".join(t["text"] for t in tokens) == expected
    assert "".join(t["text"] for t in page.samples[0]).startswith("<|User|>")
    assert not {"script", "img", "link", "iframe"} & page.tags  # self-contained


def test_summary_counts_and_marks(words):
    selection, _, _ = selection_for(words, TEXTS, REL, ATTN, CONFIG)
    text = summarize(selection, words, CONFIG, page="out/selection.html")
    assert "2 samples, 6 response tokens, 3 kept (50.0%), 1 of them thanks to the attention score" in text
    delta = words.decode(selection.input_ids[0, selection.response[0].nonzero()[1] + 1])
    assert "{" + delta + "}" in text
    assert "Selection, ssToken:" in text and "Score = 0.5 x minmax(REL) + 0.5 x AttnScore" in text
    assert "These samples, and each token's REL, AttnScore and Score on hover: out/selection.html" in text


# Six samples, rho 0.5, gamma 0.5: sample 4 keeps a token thanks to the attention score (REL and the combined
# score disagree there only), sample 5 drops the most tokens (three of six); samples 1-3 drop one each.
MANY = ["<|User|>alpha<|Assistant|>beta gamma" + {3: " delta", 4: " delta epsilon zeta"}.get(i, "") for i in range(6)]
MANY_REL = [[0.9, 0.5, 0.0]] * 3 + [[0.9, 0.1, 0.5, 0.0], [0.9, 0.8, 0.7, 0.0, 0.0, 0.0], [0.9, 0.5, 0.0]]
MANY_ATTN = [[0.0, 0.0, 0.0]] * 3 + [[0.0, 1.0, 0.0, 0.0], [0.0] * 6, [0.0, 0.0, 0.0]]


def _marked_samples(text: str) -> dict[int, str]:
    return {int(m[0]): m[1] for m in re.findall(r"^  sample (\d+): (.*)$", text, flags=re.MULTILINE)}


def test_summary_shows_the_samples_that_say_most_and_where_the_rest_is(words):
    tokenizer = build_tokenizer(MANY * 20, vocab_size=300)
    selection, _, _ = selection_for(tokenizer, MANY, MANY_REL, MANY_ATTN, CONFIG)
    rows = sample_tokens(selection, tokenizer)
    dropped = [sum(t.status == "dropped" for t in row) for row in rows]
    attention = [sum(t.status == "attention" for t in row) for row in rows]
    assert dropped == [1, 1, 1, 2, 3, 1] and attention == [0, 0, 0, 1, 0, 0]  # test setup
    text = summarize(selection, tokenizer, CONFIG, max_samples=2, page="p.html")
    shown = _marked_samples(text)
    assert set(shown) == {5, 4}  # the most dropped tokens; the one kept thanks to the attention score
    assert shown[5].count("[") == 3 and shown[4].count("{") == 1
    assert text.splitlines()[-1] == "  The other 4 samples, and each token's REL, AttnScore and Score on hover: p.html"
    assert chosen_samples(rows, 3) == [0, 3, 4]  # then the most dropped or attention-kept, earliest; batch order
    assert chosen_samples(rows, 6) == list(range(6))  # every sample, in batch order


VOCAB = 491


def test_page_names_loss_truncation_and_hides_the_attention_column(words):
    config = SSTokenConfig(**LOSS_TRUNCATION_TWO_RUNS, history_model="runs/reference")
    selection, _, _ = selection_for(words, TEXTS, REL, ATTN, CONFIG)
    page_text = render_html(selection, words, config, vocab_size=VOCAB)
    threshold = f"{math.log(VOCAB):.2f} nats"  # a uniform guess over the vocabulary
    rule = re.search(r'<p class="rule">(.*?)</p>', page_text).group(1)
    assert "loss truncation" in rule and "runs/reference" in rule and threshold in rule
    assert "Score is the reference&#x27;s loss L_ref in nats" in rule and "at most 20%" in rule
    titles = [t["attrs"]["title"] for s in Page(page_text).samples for t in s if t["status"] != "prompt"]
    assert titles and all("AttnScore" not in t and t.startswith("REL ") and "Score " in t for t in titles)
    assert "thanks to the attention score" not in page_text  # no attention term: no such status, no legend entry
    text = summarize(selection, words, config, VOCAB, page="p.html")
    assert threshold in text and "AttnScore" not in text and "braces" not in text
    with pytest.raises(ValueError, match="vocab_size"):
        render_html(selection, words, config)  # the threshold cannot be stated without the vocabulary size


@pytest.mark.parametrize(
    ("config", "columns"),
    [
        (SSTokenConfig(gamma=1.0), ("REL", "Score")),
        (SSTokenConfig(gamma=0.0), ("AttnScore", "Score")),
        (SSTokenConfig(selector="full"), ()),
        (SSTokenConfig(selector="random"), ("Score",)),
    ],
)
def test_a_signal_zero_by_construction_is_not_shown(words, config, columns):
    selection, _, _ = selection_for(words, TEXTS, REL, ATTN, CONFIG)
    page = Page(render_html(selection, words, config))
    scored = [t for s in page.samples for t in s if t["status"] != "prompt"]
    for token in scored:
        shown = tuple(part.split()[0] for part in token["attrs"]["title"].split(" | ")) if columns else ()
        assert shown == columns
        assert {"data-rel", "data-attn", "data-score"} <= set(token["attrs"])  # the data stays in the page


@pytest.fixture(scope="module")
def inspect_setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("inspect")
    rows = [{"text": f"<|User|>{r['prompt']}<|Assistant|>{r['completion']}"} for r in prompt_completion_rows(6, 5)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_model("llama", len(tokenizer), seed=1)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root, rows


def reference_keep(root, tokenizer, rows, config):
    """The paper's math on full logits and eager attention maps, with and without the adapter."""
    base = AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation="eager")
    model = PeftModel.from_pretrained(base, root / "adapter")
    batch = SSTokenCollator(tokenizer, max_length=1024)(rows)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with torch.no_grad():
        cur = model.eval()(**inputs, output_attentions=True)
        with model.disable_adapter():
            his = model(**inputs)
    rel = token_log_probs(cur.logits, batch["input_ids"]) - token_log_probs(his.logits, batch["input_ids"])
    attn = prompt_attention(cur.attentions[-1], batch["labels"], batch["attention_mask"])[:, 1:]
    response = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
    return reference_select(rel, attn, response, config.gamma, config.select_ratio), response


def test_inspect_matches_the_reference_selection(inspect_setup, tokenizer, capsys):
    root, rows = inspect_setup
    output = root / "page.html"
    args = ["--model", str(root / "model"), "--adapter", str(root / "adapter"), "--data", str(root / "data.jsonl")]
    run_inspect([*args, "--num_samples", "4", "--output", str(output), "--sstoken_select_ratio", "0.5"])
    page = Page(output.read_text())
    assert len(page.samples) == 4
    expected, response = reference_keep(root, tokenizer, rows[:4], SSTokenConfig(select_ratio=0.5))
    for b, tokens in enumerate(page.samples):
        scored = [t for t in tokens if t["status"] != "prompt"]
        assert len(scored) == int(response[b].sum())
        kept = [t["status"] in ("kept", "attention") for t in scored]
        assert kept == expected[b][response[b]].tolist()
        assert sum(kept) == math.ceil(0.5 * len(scored))
        assert any(abs(float(t["attrs"]["data-rel"])) > 1e-4 for t in scored)  # the adapter moved the model
    assert f"each token's REL, AttnScore and Score on hover: {output}" in capsys.readouterr().out


def test_inspect_with_loss_truncation_against_run_1_matches_a_plain_loop(inspect_setup, tokenizer):
    root, rows = inspect_setup
    output = root / "recommended.html"
    args = ["--model", str(root / "model"), "--adapter", str(root / "adapter"), "--data", str(root / "data.jsonl")]
    reference = ["--sstoken_history_model", str(root / "model")]  # stands in for run 1: the model it truncates by
    two_runs = ["--sstoken_selector", "loss_truncation", "--sstoken_history", "model", "--sstoken_select_ratio", "0.8"]
    two_runs += ["--sstoken_scope", "batch", "--sstoken_protect_response_end", "true"]
    run_inspect([*args, "--num_samples", "4", "--output", str(output), *two_runs, *reference])
    config = SSTokenConfig(**LOSS_TRUNCATION_TWO_RUNS)
    base = AutoModelForCausalLM.from_pretrained(root / "model")
    model = PeftModel.from_pretrained(base, root / "adapter").eval()
    batch = SSTokenCollator(tokenizer, max_length=1024)(rows[:4])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logp_cur = token_log_probs(model(**inputs).logits, batch["input_ids"])
        logp_ref = token_log_probs(
            AutoModelForCausalLM.from_pretrained(root / "model")(**inputs).logits, inputs["input_ids"]
        )
    threshold = config.truncation_loss * math.log(base.config.vocab_size)
    suspects, safe, shown = [], set(), {}  # suspect: L_ref above a uniform guess and not a response's last token
    for b in range(4):
        positions = (batch["labels"][b, 1:] != -100).nonzero().flatten().tolist()
        for t in positions:
            ref_loss = -float(logp_ref[b, t])
            shown[b, t] = float(logp_cur[b, t] - logp_ref[b, t])
            if ref_loss > threshold and t != positions[-1]:
                suspects.append((ref_loss, b, t))
            else:
                safe.add((b, t))
    total = len(safe) + len(suspects)
    room = max(0, math.ceil(config.select_ratio * total) - len(safe))  # one batch: at least ceil(rho n) kept
    kept = safe | {(b, t) for _, b, t in sorted(suspects)[:room]}  # the suspects of lowest L_ref fill it
    assert suspects and len(kept) < total  # something is truncated
    page = Page(output.read_text())
    for b, sample in enumerate(page.samples):
        scored = [t["status"] in ("kept", "attention") for t in sample if t["status"] != "prompt"]
        positions = (batch["labels"][b, 1:] != -100).nonzero().flatten().tolist()
        assert scored == [(b, t) in kept for t in positions]
        assert scored[-1]  # the protected end
        rels = [float(t["attrs"]["data-rel"]) for t in sample if t["status"] != "prompt"]
        assert rels == pytest.approx([shown[b, t] for t in positions], abs=1e-3)  # REL against the reference


def test_inspect_command_without_adapter_ranks_by_attention(inspect_setup, tmp_path):
    root, _ = inspect_setup
    command = shutil.which("sstoken-inspect")
    assert command, "the sstoken-inspect entry point is not installed: pip install -e ."
    output = tmp_path / "page.html"
    args = ["--model", str(root / "model"), "--data", str(root / "data.jsonl"), "--num_samples", "2"]
    done = subprocess.run([command, *args, "--output", str(output)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "REL is 0" in done.stdout
    scored = [t for s in Page(output.read_text()).samples for t in s if t["status"] != "prompt"]
    assert scored and all(float(t["attrs"]["data-rel"]) == 0.0 for t in scored)


def test_packed_row_renders_each_document_and_keeps_eos_tokens(words):
    """Samples come from the layout, not from the pad id (which is EOS after load_tokenizer)."""
    single, _, _ = selection_for(words, TEXTS[:1], REL[:1], ATTN[:1], CONFIG)
    eos = words.pad_token_id  # as after load_tokenizer, where the pad token is EOS
    real = single.real[0]
    ids = single.input_ids[0][real]
    labels = single.labels[0][real]
    # One packed row: [doc 1 + EOS][doc 1 + EOS]; the EOS is a labelled response token and equals the pad id.
    row_ids = torch.cat([ids, torch.tensor([eos]), ids, torch.tensor([eos])])[None]
    row_labels = torch.cat([labels, torch.tensor([eos]), labels, torch.tensor([eos])])[None]
    n = ids.numel() + 1
    position_ids = torch.cat([torch.arange(n), torch.arange(n)])[None]
    layout = batch_layout(row_labels, None, position_ids)
    scores = torch.rand(layout.response.shape)
    selection = BatchSelection(
        row_ids,
        row_labels,
        layout.real,
        layout.doc,
        layout.response,
        scores,
        scores,
        scores,
        layout.response,
        layout.response,
    )
    page = Page(render_html(selection, words, CONFIG))
    assert len(page.samples) == 2
    for tokens in page.samples:
        expected = words.decode(row_ids[0, :n], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert "".join(t["text"] for t in tokens) == expected
        assert tokens[-1]["status"] == "kept"  # the EOS response token is shown and scored, not taken for padding


def test_rule_states_the_one_run_recommendation_with_its_clip_in_nats():
    rule = describe_rule(SSTokenConfig(**RECOMMENDED_ONE_RUN), vocab_size=VOCAB)
    assert rule.columns == ("REL", "Score")  # gamma 1: no attention term
    assert f"L_his clipped at log V = {math.log(VOCAB):.2f} nats" in rule.text
    assert "Score = REL and the top ceil(0.8 x n) are kept" in rule.text and "last token is always kept" in rule.text
    assert "The first 50% of the steps train on every response token" in rule.text


def test_content_note_names_numbers_and_names_left_out_but_not_sentence_openers():
    def tokens(*pairs: tuple[str, str]) -> list[Token]:
        return [Token(text, status) for text, status in pairs]

    left_out = tokens(("<|Assistant|>", "prompt"), ("It", "down"), (" is", "kept"), (" 46", "down"))
    assert "1 of the 2 left-out tokens" in content_note(left_out) and "'46'" in content_note(left_out)
    names = tokens((" lives", "kept"), (" in", "kept"), (" Dun", "dropped"), ("holt", "dropped"), (".", "kept"))
    assert "'Dun'" in content_note(names)
    openers = tokens(("short", "kept"), (".", "kept"), (" But", "down"), ("\n", "kept"), ("Well", "down"))
    assert content_note(openers) is None
    assert content_note(tokens((" 46", "kept"), (" Dun", "kept"))) is None  # kept content is no concern
    assert not looks_like_content(" the") and not looks_like_content(" USA", " in")  # an acronym is not a word
