"""Sampling penalties as OpenAI defines them, stop strings held back and cut, chat templates."""

from __future__ import annotations

import json

import torch

from shunter.cli import main
from shunter.model.sampling import SamplingParams, TokenCounts, apply_penalties, next_tokens
from shunter.serve.chat import load_chat_template, plain_template
from shunter.serve.text import TextStream, held_back


def test_penalties_subtract_frequency_times_count_and_presence_once():
    """Oracle: OpenAI's formula, mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0, 1, 3, 0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    expected = torch.tensor([[1.0, 2.0 - 0.5 - 0.25, 3.0 - 1.5 - 0.25, 4.0]])
    assert torch.equal(apply_penalties(logits, counts, params), expected)


def test_a_penalty_turns_greedy_away_from_a_repeated_token():
    logits = torch.tensor([[0.0, 5.0, 4.5]])
    params = SamplingParams(frequency_penalty=1.0)
    counts = TokenCounts(1, 3, params)
    picked = []
    for _ in range(3):
        token = next_tokens(logits, params, None, counts)
        counts.add(token)
        picked.append(int(token))
    assert picked == [1, 2, 1]  # 5 > 4.5; then 5-1 < 4.5; then 4 > 4.5-1


def test_generate_with_a_frequency_penalty_leaves_the_builtin_models_loop(capsys):
    argv = ["generate", "--prompt", "The river", "--max-new-tokens", "24", "--json"]
    assert main(argv) == 0
    greedy = json.loads(capsys.readouterr().out)["generated_ids"]
    assert main([*argv, "--frequency-penalty", "1.5"]) == 0
    penalised = json.loads(capsys.readouterr().out)["generated_ids"]
    # greedy, the built-in model loops on a few tokens (which ones moves with rounding); penalised,
    # it leaves the loop
    assert len(set(greedy)) <= len(greedy) // 3 < len(set(penalised))


def test_a_penalty_outside_openais_range_is_one_line(capsys):
    assert main(["generate", "--prompt-ids", "1", "--presence-penalty", "3"]) == 2
    assert "--presence-penalty: must lie in [-2, 2]" in capsys.readouterr().err


def test_text_that_may_begin_a_stop_string_waits_and_the_stop_string_is_never_sent():
    pieces = ["Hel", "lo wo", "rld!", " more"]
    stream = TextStream(lambda ids: "".join(pieces[: len(ids)]), ["world"])
    sent = [stream.push(list(range(n))) for n in (1, 2, 3)]
    assert sent == [("Hel", False), ("lo ", False), ("", True)]  # "wo" waited, then "world" matched
    assert held_back("abc\ufffd", []) == 1 and held_back("say wor", ["world"]) == 3


def test_a_length_finish_sends_what_was_held_back():
    stream = TextStream(lambda ids: "ab"[: len(ids)], ["bc"])
    assert stream.push([0]) == ("a", False)
    assert stream.push([0, 1]) == ("", False)  # "b" may begin "bc"
    assert stream.finish([0, 1]) == "b"


def test_the_models_chat_template_renders_the_conversation(tmp_path):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
    template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "</s>"})
    )
    render = load_chat_template(tmp_path)
    assert render([{"role": "user", "content": "hi"}]) == "<user>hi</s><assistant>"
    assert load_chat_template(tmp_path / "missing") is plain_template
    assert plain_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]) == (
        "system: be brief\nuser: hi\nassistant:"
    )
