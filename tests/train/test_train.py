"""Training: exact resume, an export both runtimes load, and clear errors for bad input."""

from __future__ import annotations

import dataclasses
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from shunter.cli import main
from shunter.errors import ShunterError
from shunter.model import Batch, load_model
from shunter.train import TrainConfig, Trainer

TINY = TrainConfig(
    vocab_size=320,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=4,
    top_k=2,
    expert_intermediate_size=32,
    max_position_embeddings=64,
    seq_len=32,
    batch_size=4,
    steps=6,
    warmup_steps=2,
    checkpoint_every=3,
    heldout_percent=30,
    save_dtype="float32",
    bf16_autocast=False,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A handful of real standard-library files."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in (
        "bisect.py",
        "colorsys.py",
        "keyword.py",
        "this.py",
        "stat.py",
        "heapq.py",
        "abc.py",
        "glob.py",
    ):
        shutil.copy(stdlib / name, root / name)
    return root


def test_interrupted_and_resumed_run_ends_with_the_same_loss(corpus, tmp_path):
    """Oracle: the same seed trained straight through."""
    straight = Trainer(TINY, corpus, tmp_path / "a" / "model", log=lambda _: None).run()
    first_half = Trainer(TINY, corpus, tmp_path / "b" / "model", log=lambda _: None)
    assert first_half.run(stop_after=4) is None  # stops between checkpoints: state saved at step 4
    assert not (tmp_path / "b" / "model").exists()  # nothing exported from an unfinished run
    resumed = Trainer(TINY, corpus, tmp_path / "b" / "model", log=lambda _: None).run(resume=True)
    assert resumed.final_loss == straight.final_loss
    assert [ce for _, ce, _ in resumed.losses] == [ce for _, ce, _ in straight.losses]


def test_trained_model_loads_in_transformers_with_matching_logits(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    result = Trainer(TINY, corpus, tmp_path / "model", log=lambda _: None).run()
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= {
        p.name for p in result.out_dir.iterdir()
    }
    tokens = torch.tensor([[5, 17, 200, 3, 99, 12, 7]])
    ours = load_model(result.out_dir).model.forward(
        Batch(tokens, torch.arange(7)[None], torch.ones(1, 7, dtype=bool), 0)
    )
    reference = AutoModelForCausalLM.from_pretrained(result.out_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
    assert (ours - expected).abs().max().item() <= 1e-4
    assert result.heldout["model_bits_per_byte"] > 0 and result.heldout["unigram_bits_per_byte"] > 0


def test_an_existing_checkpoint_needs_resume(corpus, tmp_path):
    Trainer(TINY, corpus, tmp_path / "model", log=lambda _: None).run(stop_after=3)
    with pytest.raises(ShunterError, match="pass --resume"):
        Trainer(TINY, corpus, tmp_path / "model", log=lambda _: None).run()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp: ["--corpus", str(tmp / "missing")], "corpus path not found"),
        (lambda tmp: ["--corpus", str(tmp / "empty")], "corpus is empty"),
        (
            lambda tmp: ["--top-k", "9", "--num-experts", "8"],
            "--top-k: 9 is greater than the number of experts (8)",
        ),
        (lambda tmp: ["--config", str(tmp / "bad.toml")], "unknown key 'hidden'"),
    ],
)
def test_bad_training_input_exits_nonzero_with_a_clear_line(corpus, tmp_path, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.toml").write_text("hidden = 3\n")
    argv = ["train", "--out", str(tmp_path / "model"), "--corpus", str(corpus), "--steps", "1"]
    status = main(argv + make_args(tmp_path))
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_unwritable_output_fails_before_any_work(corpus, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    status = main(["train", "--out", str(tmp_path / "a-file" / "model"), "--corpus", str(corpus)])
    assert status == 2
    assert "not a writable directory" in capsys.readouterr().err
    assert not list(tmp_path.glob("a-file*work"))


def test_resume_may_change_the_number_of_steps_but_nothing_else(corpus, tmp_path):
    import dataclasses

    Trainer(TINY, corpus, tmp_path / "model", log=lambda _: None).run(stop_after=3)
    longer = dataclasses.replace(TINY, steps=8)
    assert Trainer(longer, corpus, tmp_path / "model", log=lambda _: None).run(resume=True).steps == 8
    other = dataclasses.replace(TINY, lr=1e-4)
    Trainer(TINY, corpus, tmp_path / "other", log=lambda _: None).run(stop_after=3)
    with pytest.raises(ShunterError, match=r"different configuration \(lr\)"):
        Trainer(other, corpus, tmp_path / "other", log=lambda _: None).run(resume=True)


def test_a_directory_shunter_did_not_write_is_never_replaced(corpus, tmp_path, capsys):
    """`--out` naming a user's directory (here holding a file) is refused before any work, and the
    file survives; --overwrite is the one way to replace it."""
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("precious")
    argv = ["train", "--out", str(user_dir), "--corpus", str(corpus), "--steps", "1"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (user_dir / "notes.txt").read_text() == "precious"
    assert not (tmp_path / "mine.work").exists()


def test_a_model_shunter_wrote_is_replaced_by_the_next_export(corpus, tmp_path):
    Trainer(TINY, corpus, tmp_path / "model", tmp_path / "w1", log=lambda _: None).run()
    first = (tmp_path / "model" / "model.safetensors").read_bytes()
    other = dataclasses.replace(TINY, seed=1)
    Trainer(other, corpus, tmp_path / "model", tmp_path / "w2", log=lambda _: None).run()
    assert (tmp_path / "model" / "model.safetensors").read_bytes() != first
    assert not list(tmp_path.glob(".model.*"))


def test_overwrite_replaces_a_users_directory(corpus, tmp_path):
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("old")
    Trainer(TINY, corpus, user_dir, log=lambda _: None, overwrite=True).run()
    assert not (user_dir / "notes.txt").exists()
    assert (user_dir / "config.json").is_file()


def test_a_finished_run_resumes_at_its_last_step(corpus, tmp_path):
    """A finished 6-step run resumed with --steps 8 continues at step 6 (its recorded losses are the
    first run's, then two more steps), instead of starting over."""
    messages: list[str] = []
    finished = Trainer(TINY, corpus, tmp_path / "model", log=lambda _: None).run()
    longer = dataclasses.replace(TINY, steps=8)
    resumed = Trainer(longer, corpus, tmp_path / "model", log=messages.append).run(resume=True)
    assert any("resumed at step 6" in m for m in messages)
    assert resumed.losses[:6] == finished.losses
    assert [step for step, _, _ in resumed.losses[6:]] == [6, 7]


def test_resume_without_a_checkpoint_is_refused(corpus, tmp_path):
    with pytest.raises(ShunterError, match="no checkpoint to resume"):
        Trainer(TINY, corpus, tmp_path / "model", log=lambda _: None).run(resume=True)


def test_resume_refuses_a_changed_architecture_after_a_finished_run(corpus, tmp_path):
    Trainer(TINY, corpus, tmp_path / "model", log=lambda _: None).run()
    wider = dataclasses.replace(TINY, hidden_size=64, steps=8)
    with pytest.raises(ShunterError, match=r"different configuration \(hidden_size\)"):
        Trainer(wider, corpus, tmp_path / "model", log=lambda _: None).run(resume=True)
