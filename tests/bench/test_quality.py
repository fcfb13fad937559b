"""shunter.bench.quality without llama.cpp: its output parsers on captured llama-perplexity output,
its window schemes against llama-perplexity's counts, and token byte counts against the tokenizer."""

import pytest

from shunter.bench.quality import (
    bits_per_byte,
    byte_level_token_bytes,
    halves,
    parse_kl_divergence,
    parse_perplexity,
    perplexity_argv,
    strided,
)
from shunter.errors import ShunterError
from shunter.model.loader import resolve_model_dir
from shunter.model.tokenizer import Tokenizer

# llama-perplexity --kl-divergence on shunter-tiny Q4_1, 8 chunks of 256 (stdout; abridged)
KL_OUTPUT = """\

====== Perplexity statistics ======
Mean PPL(Q)                   :  15.010355 ±   1.268043
Mean PPL(base)                :  14.870949 ±   1.253603
Cor(ln(PPL(Q)), ln(PPL(base))):  99.94%
Mean ln(PPL(Q)/PPL(base))     :   0.009331 ±   0.003003

====== KL divergence statistics ======
Mean    KLD:   0.005148 ±   0.000268
Maximum KLD:   0.114447
99.9%   KLD:   0.088378
99.0%   KLD:   0.047022
95.0%   KLD:   0.015860
Median  KLD:   0.002956
Minimum KLD:   0.000005

====== Token probability statistics ======
Mean    Δp: -0.129 ± 0.056 %
RMS Δp    :  1.774 ± 0.106 %
Same top p: 95.669 ± 0.639 %
"""


def test_parse_kl_divergence_reads_the_summary():
    assert parse_kl_divergence(KL_OUTPUT) == {
        "ppl": 15.010355,
        "kl_mean": 0.005148,
        "kl_max": 0.114447,
        "kl_p99": 0.047022,
        "same_top_percent": 95.669,
    }


def test_parse_kl_divergence_names_a_missing_line():
    with pytest.raises(ShunterError, match="kl_max"):
        parse_kl_divergence(KL_OUTPUT.replace("Maximum KLD", "Largest KLD"))


def test_parse_perplexity_final_line_and_strided_running_figure():
    assert parse_perplexity("0.04.99 I Final estimate: PPL = 14.8709 +/- 1.25360\n") == 14.8709
    strided_stdout = "0.00 minutes\n[1]22.4970,[2]33.3172,[3]29.4904,[8]16.9648,\n"
    assert parse_perplexity(strided_stdout) == 16.9648
    with pytest.raises(ShunterError):
        parse_perplexity("no figures here")


def test_schemes_count_windows_and_targets_as_llama_perplexity_does():
    # perplexity_v2 on 2048 tokens, n_ctx 256, stride 255: 8 windows, every token but the first
    s = strided(256)
    assert s.starts(2048) == [i * 255 for i in range(8)]
    assert s.targets(2048).tolist() == list(range(1, 2041))
    # perplexity: 8 chunks of 256, targets 129..255 of each (n_ctx - 1 - n_ctx/2 = 127 per chunk)
    h = halves(256)
    targets = h.targets(2048)
    assert len(targets) == 8 * 127
    assert targets[:2].tolist() == [129, 130] and targets[126:128].tolist() == [255, 385]
    with pytest.raises(ShunterError):
        h.starts(255)


def test_strided_argv_asks_for_a_context_llama_widens_to_the_window():
    argv = perplexity_argv("llama-perplexity", "m.gguf", "t.txt", strided(256), threads=2)
    context = int(argv[argv.index("-c") + 1])
    stride = int(argv[argv.index("--ppl-stride") + 1])
    assert context + stride // 2 == 256 and stride == 255
    assert "tokenizer.ggml.add_bos_token=bool:false" in argv


def test_token_bytes_sum_to_the_text_bytes():
    path = resolve_model_dir("shunter-tiny") / "tokenizer.json"
    tokenizer = Tokenizer(path)
    lengths = byte_level_token_bytes(path)
    text = "def f(x):\n    return x * 2  # naïve, 中文 €\n"
    ids = tokenizer.encode(text)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.token_id("<|endoftext|>")] == 0


def test_bits_per_byte_from_perplexity():
    assert bits_per_byte(2.0, scored_tokens=10, scored_bytes=5) == pytest.approx(2.0)


def test_a_missing_llama_build_or_gguf_is_one_line_and_writes_nothing(tmp_path, capsys):
    from shunter.bench.quality import main

    work = tmp_path / "work"
    base = ["--workdir", str(work), "--llama-base"]
    assert main(["--llama-bin", str(tmp_path), *base, str(tmp_path / "base.gguf")]) == 2
    assert "no llama-perplexity there" in capsys.readouterr().err
    (tmp_path / "llama-perplexity").write_text("")
    assert main(["--llama-bin", str(tmp_path), *base, str(tmp_path / "base.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"shunter: error: --llama-base {tmp_path / 'base.gguf'}: no such GGUF file"
    assert not work.exists()
