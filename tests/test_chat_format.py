"""Prompt formats: chat-template pieces, the format stored with the tokenizer, exact loss masks in the
agent loop for raw and chat, and a student's re-encoding of expert text matching the loop's ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from retroact.agent.loop import LoopConfig, run_trials
from retroact.agent.records import TrajectoryRecord, write_records
from retroact.data.il_dataset import load_role_data
from retroact.envs import get_spec, list_tasks
from retroact.models.base import Generation, GenRequest, Policy, PolicyInfo, SamplingParams, SegmentKind
from retroact.models.chat import (
    FORMAT_KEY,
    ChatPieces,
    PromptFormat,
    SegmentEncoder,
    prompt_format_of,
    set_prompt_format,
    split_prefix,
)
from retroact.models.hf import HFPolicy
from tests.tiny import HOUSEHOLD, make_tiny_model, overfit

SYSTEM = "Be brief."
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)



def chat_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tiny tokenizer with ChatML markers as special tokens, <|im_end|> as EOS, and a template."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


def household_chat_ids(enc: SegmentEncoder) -> list[int]:
    """The HOUSEHOLD trajectory as a chat: observations as user turns, actions as assistant turns."""
    lines = HOUSEHOLD.splitlines()
    pieces: list[tuple[str, SegmentKind]] = [("\n".join(lines[:2]) + "\n> ", "prompt")]
    for line in lines[2:]:
        if line.startswith("> "):
            pieces.append((line[2:], "model"))  # no newline: the turn ends with <|im_end|>
        else:
            pieces.append((line + "\n> ", "env"))
    return [i for ids in enc.encode_many(pieces) for i in ids]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model (format stored with its tokenizer), briefly trained on one household chat
    so that greedy decoding writes actions and ends its turns with <|im_end|>."""
    path = make_tiny_model(tmp_path_factory.mktemp("chat"))
    tok = chat_tokenizer(path)
    set_prompt_format(tok, "chat")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    ids = torch.tensor([household_chat_ids(SegmentEncoder(tok))])
    overfit(model, ids, 80)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_chat_pieces_come_from_the_template(tmp_path: Path) -> None:
    tok = chat_tokenizer(make_tiny_model(tmp_path))
    pieces = ChatPieces.of(tok)
    assert pieces == ChatPieces(
        head=f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n",
        to_assistant="<|im_end|>\n<|im_start|>assistant\n",
        to_user="<|im_end|>\n<|im_start|>user\n",
    )
    enc = SegmentEncoder(tok, "chat")
    prompt = enc.text("Task: find a pen.\n> ", "prompt")
    assert prompt == pieces.head + "Task: find a pen." + pieces.to_assistant + "> "
    assert enc.text("Nothing happens.\n", "env") == pieces.to_user + "Nothing happens." + pieces.to_assistant
    assert enc.text("go to desk 1\n", "model") == "go to desk 1\n"
    # The template's markers become their special tokens, and no BOS is added on top.
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = enc.encode("Hi\nReflection:", "prompt")
    assert ids[0] == start and ids.count(end) == 2 and tok.bos_token_id not in ids
    assert tok.decode(ids) == pieces.head + "Hi" + pieces.to_assistant + "Reflection:"


def test_split_prefix() -> None:
    assert split_prefix("obs\n> ") == ("obs\n", "> ")
    assert split_prefix("obs\n") == ("obs\n", "")
    assert split_prefix("Reflection:") == ("", "Reflection:")


def test_templates_that_cannot_serve_are_refused(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path))
    with pytest.raises(ValueError, match="no chat template"):
        SegmentEncoder(tok, "chat")
    with pytest.raises(ValueError, match="no chat template"):
        set_prompt_format(tok, "chat")
    # A template that marks the last message renders earlier turns differently once more follow.
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="turn by turn"):
        ChatPieces.of(tok)
    tok.chat_template = "{{ raise_exception('system messages only') }}"
    with pytest.raises(ValueError, match="cannot render"):
        ChatPieces.of(tok)


def test_format_travels_with_the_tokenizer(chat_model: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_model)
    assert prompt_format_of(tok) == "chat"
    tok.save_pretrained(tmp_path / "copy")  # what IL and RL checkpoints do
    assert prompt_format_of(AutoTokenizer.from_pretrained(tmp_path / "copy")) == "chat"
    assert HFPolicy.load(chat_model).prompt_format == "chat"
    assert HFPolicy.load(chat_model, prompt_format="raw").prompt_format == "raw"
    plain = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path))
    assert prompt_format_of(plain) == "raw"
    plain.init_kwargs[FORMAT_KEY] = "jinja"
    with pytest.raises(ValueError, match="retroact_prompt_format is 'jinja'"):
        prompt_format_of(plain)


def check_exact_masks(rec: TrajectoryRecord, enc: SegmentEncoder) -> int:
    """Asserts the record's ids are its segments encoded as the loop does, with mask 1 exactly on
    model tokens; returns how many model segments ended without a newline (the model ended its turn)."""
    assert rec.prompt_ids == enc.encode(rec.prompt, "prompt")
    ids, mask = rec.output_ids or [], rec.loss_mask or []
    pos = ended = 0
    for seg in rec.segments:
        if seg.kind == "env":
            piece = enc.encode(seg.text, "env")
            assert ids[pos : pos + len(piece)] == piece and not any(mask[pos : pos + len(piece)])
            pos += len(piece)
            continue
        end = pos
        while end < len(mask) and mask[end]:
            end += 1
        assert enc.tokenizer.decode(ids[pos:end], skip_special_tokens=True) == seg.text
        assert all(lp < 0 for lp in (rec.behaviour_logprobs or [])[pos:end])
        ended += not seg.text.endswith("\n")
        pos = end
    assert pos == len(ids)
    return ended


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_loop_masks_cover_exactly_the_model_tokens(chat_model: Path, fmt: PromptFormat) -> None:
    policy = HFPolicy.load(chat_model, prompt_format=fmt)
    tasks = list_tasks("household", "train", 3, 0)
    cfg = LoopConfig(trials=2, max_steps=3, temperature=1.0, seed=1)
    result = run_trials("household", tasks, policy, policy, cfg)
    roles = {r.role for r in result.records}
    assert roles == {"planner", "reflector"} and result.n_errors == 0
    ended = sum(check_exact_masks(r, policy.segments) for r in result.records)
    first = result.records[0]
    if fmt == "chat":
        assert policy.decode(first.prompt_ids or []).startswith("system\n" + SYSTEM)
        assert ended > 0, "some turns should end with the sampled <|im_end|>, which is not kept"
        eos = policy.tokenizer.eos_token_id
        for rec in result.records:
            written = [i for i, m in zip(rec.output_ids or [], rec.loss_mask or [], strict=True) if m]
            assert eos not in written
    else:
        assert (first.prompt_ids or [])[0] == policy.tokenizer.bos_token_id


class Replay:
    """A scripted expert as a tokenised policy that writes the expert's text in its plain tokens."""

    tokenized = True

    def __init__(self, expert: Policy, enc: SegmentEncoder) -> None:
        self.expert, self.enc = expert, enc
        self.info = PolicyInfo(f"replay:{expert.info.name}")

    def encode(self, text: str, kind: SegmentKind) -> list[int]:
        return self.enc.encode(text, kind)

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingParams) -> list[Generation]:
        out = []
        for gen in self.expert.generate(requests, sampling):
            ids = self.enc.encode(gen.text, "model")
            out.append(Generation(gen.text, ids, [-1.0] * len(ids), mistake=gen.mistake))
        return out


def replay_experts(enc: SegmentEncoder, mistakes: float = 0.0) -> tuple[Replay, Replay]:
    planner, reflector = get_spec("household").experts(mistakes=mistakes)
    return Replay(planner, enc), Replay(reflector, enc)


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_student_encoding_of_expert_text_matches_the_loop(
    chat_model: Path, tmp_path: Path, fmt: PromptFormat
) -> None:
    tok = AutoTokenizer.from_pretrained(chat_model)
    set_prompt_format(tok, fmt)
    enc = SegmentEncoder(tok)
    tasks = list_tasks("household", "train", 6, 0)
    cfg = LoopConfig(trials=2, max_steps=6)  # short trials: some fail and get reflections
    # with deliberate mistakes: written in the model's place, masked like env text
    text = run_trials("household", tasks, *get_spec("household").experts(mistakes=0.3), cfg).records
    tokens = run_trials("household", tasks, *replay_experts(enc, mistakes=0.3), cfg).records
    assert len(text) == len(tokens) and any(r.role == "reflector" for r in text)
    assert any(s.kind == "mistake" for r in text for s in r.segments)
    encoded = enc.encode_records([(r.prompt, [(s.kind, s.text) for s in r.segments]) for r in text])
    for rec, want, got in zip(text, tokens, encoded, strict=True):
        assert not rec.tokenized and rec.prompt == want.prompt
        assert got == (want.prompt_ids, want.output_ids, want.loss_mask)
    # the IL dataset's own encoding of text records is the same
    write_records(tmp_path / "planner.jsonl", [r for r in text if r.role == "planner"])
    data = load_role_data(tmp_path, "planner", enc.tokenizer, max_length=100_000)
    planner = [g for r, g in zip(text, encoded, strict=True) if r.role == "planner"]
    assert [(e.prompt_ids, e.output_ids, e.target_mask) for e in data.examples] == planner
