"""The built-in tiny model: tokenizer behaviour, standard HF loading, seeded weights, config checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from retroact.models.tiny import TinyModelConfig, build_tiny_model
from tests.tiny import HOUSEHOLD, SMALL, make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_default_config_builds_a_standard_hf_model(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path, [HOUSEHOLD] * 4)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    default = TinyModelConfig()
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.max_position_embeddings == default.max_positions >= 2048
    assert model.config.hidden_size == default.hidden_size
    assert model.config.vocab_size == len(tok) <= default.vocab_size
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert {tok.pad_token, tok.bos_token, tok.eos_token} == {"<pad>", "<s>", "</s>"}


def test_tokenizer_round_trips_any_text_exactly(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    for text in [HOUSEHOLD, "  two  spaces\tand tab ", "é ünïcode ✓ 😀", "a > b >> c\n\n\n", "x = 'it''s'"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_newline_and_step_prefix_are_single_tokens(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    newline = tok.encode("\n", add_special_tokens=False)
    prefix = tok.encode("> ", add_special_tokens=False)
    assert len(newline) == 1 and len(prefix) == 1
    ids = tok.encode("OK.\n\n> go to desk 1\n> ", add_special_tokens=False)
    assert ids.count(newline[0]) == 3 and ids.count(prefix[0]) == 2
    # the loop tokenises the prompt and the action apart; that must match tokenising the whole text
    whole = tok.encode("On the desk 1.\n> go to desk 1\n", add_special_tokens=False)
    parts = tok.encode("On the desk 1.\n> ", add_special_tokens=False) + tok.encode(
        "go to desk 1\n", add_special_tokens=False
    )
    assert whole == parts


def test_tokenizer_adds_bos_by_default_like_llama(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok("go to desk 1")["input_ids"] == [
        tok.bos_token_id,
        *tok.encode("go to desk 1", add_special_tokens=False),
    ]


def test_build_is_deterministic_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    a = make_tiny_model(tmp_path / "a")
    b = make_tiny_model(tmp_path / "b")
    c = make_tiny_model(tmp_path / "c", config=SMALL.model_copy(update={"seed": 1}))
    assert torch.equal(state, torch.random.get_rng_state())
    weights = [AutoModelForCausalLM.from_pretrained(d).lm_head.weight for d in (a, b, c)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"max_positions": 1024}, "greater than or equal to 2048"),
        ({"hidden_size": 100, "num_heads": 3}, "not divisible by num_heads"),
        ({"layers": 2}, "Extra inputs are not permitted"),
    ],
)
def test_config_is_validated(update: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TinyModelConfig(**update)
