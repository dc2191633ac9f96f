"""Prompt formats: how a tokenised policy turns the loop's prompt, model and env texts into ids.

``raw`` (base models, the tiny model): a prompt is BOS + its text; env and model texts are their
plain tokens. ``chat`` (instruct models): the episode is a conversation through the tokenizer's
chat template. The prompt is the first user turn, every env text the next user turn, every model
text an assistant turn. The unfinished last line of a prompt or env text (the loop's step prefix,
e.g. ``"> "``, or ``"Reflection:"``) opens the assistant turn, so the model continues it exactly
as in raw format. An env segment starts by closing the assistant turn before it: the turn's
end-of-turn token is context, not model output, so when the model samples it, the policy does not
keep it (as a stop string) and loss masks cover exactly the text the model wrote, in either
format.

Every piece is tokenised on its own with ``add_special_tokens=False`` (the template's markers are
special tokens in the text), so the loop at run time and a student re-encoding an expert's text
record (:meth:`SegmentEncoder.encode_records`) get the same ids.

The format travels with the tokenizer: ``tokenizer_config.json`` key ``retroact_prompt_format``
(set by ``retroact init-model --from ... --prompt-format``), which ``save_pretrained`` keeps, so
IL and RL checkpoints inherit it. A tokenizer without the key is ``raw``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, cast, get_args

from retroact.models.base import WRITTEN, Generation, SegmentKind

if TYPE_CHECKING:  # text-only backends use split_prefix without loading transformers
    from transformers import PreTrainedTokenizerBase

PromptFormat = Literal["raw", "chat"]
FORMAT_KEY = "retroact_prompt_format"
_SENTINELS = ("RETROACTSENTINELUSERONE", "RETROACTSENTINELASSISTANT", "RETROACTSENTINELUSERTWO")


def prompt_format_of(tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """The format stored with the tokenizer (``raw`` when none is)."""
    value = tokenizer.init_kwargs.get(FORMAT_KEY, "raw")
    if value not in get_args(PromptFormat):
        raise ValueError(f"tokenizer_config.json: {FORMAT_KEY} is {value!r}; expected 'raw' or 'chat'")
    return cast(PromptFormat, value)


def set_prompt_format(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat) -> None:
    """Record ``fmt`` in the tokenizer; ``save_pretrained`` writes it to tokenizer_config.json."""
    if fmt == "chat":
        ChatPieces.of(tokenizer)  # fail now, not at the first rollout, if the template cannot serve
    tokenizer.init_kwargs[FORMAT_KEY] = fmt


@dataclass(frozen=True)
class ChatPieces:
    """The template's text around turns: ``head`` + user + ``to_assistant`` + assistant + ``to_user`` + ..."""

    head: str
    """Everything before the first user message (BOS, default system prompt, user header)."""
    to_assistant: str
    """From the end of a user message to the start of the assistant's reply (generation prompt)."""
    to_user: str
    """From the end of an assistant message to the start of the next user message."""

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> ChatPieces:
        """Read the pieces off the template by rendering sentinel conversations of one and three turns."""
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; use prompt format 'raw'")
        u1, a1, u2 = _SENTINELS
        try:
            one = _render(tokenizer, [("user", u1)])
            three = _render(tokenizer, [("user", u1), ("assistant", a1), ("user", u2)])
        except Exception as err:  # jinja errors of arbitrary templates
            raise ValueError(f"the chat template cannot render a user/assistant conversation: {err}") from err
        head, _, to_assistant = one.partition(u1)
        head3, _, rest = three.partition(u1)
        between, _, rest = rest.partition(a1)
        to_user, _, tail = rest.partition(u2)
        if not (u1 in one and head3 == head and between == to_assistant and tail == to_assistant):
            raise ValueError(
                "the chat template does not render a conversation turn by turn (earlier turns change "
                "when later ones are added); use prompt format 'raw'"
            )
        return cls(head, to_assistant, to_user)


def _render(tokenizer: PreTrainedTokenizerBase, turns: list[tuple[str, str]]) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def split_prefix(text: str) -> tuple[str, str]:
    """``text`` cut after its last newline: (complete lines, unfinished last line)."""
    cut = text.rfind("\n") + 1
    return text[:cut], text[cut:]


class SegmentEncoder:
    """Token ids of segment texts for one tokenizer and prompt format (None: the tokenizer's own)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat | None = None) -> None:
        self.tokenizer = tokenizer
        self.format: PromptFormat = fmt or prompt_format_of(tokenizer)
        self.chat = ChatPieces.of(tokenizer) if self.format == "chat" else None
        self.space_to_model = _space_starts_words(tokenizer)
        """Context text ending in a space (the step prefix "> ") loses that space, which the model
        then writes as the start of its first word ("> go" is ">", " go" for such tokenizers:
        a lone " " token before "go" is a context the pretrained model never saw)."""

    def text(self, text: str, kind: SegmentKind) -> str:
        """The string that is tokenised for a segment (the template's markers included)."""
        if self.chat is None or kind in WRITTEN:
            return text
        lines, prefix = split_prefix(text)
        opening = self.chat.head if kind == "prompt" else self.chat.to_user
        return opening + lines.strip() + self.chat.to_assistant + prefix

    def tokenised(self, text: str, kind: SegmentKind) -> str:
        """:meth:`text` less the trailing space a context leaves to the model (``space_to_model``)."""
        full = self.text(text, kind)
        return full[:-1] if self.space_to_model and kind not in WRITTEN and full.endswith(" ") else full

    def encode(self, text: str, kind: SegmentKind) -> list[int]:
        return self.encode_many([(text, kind)])[0]

    def model_text(self, text: str, before: tuple[str, SegmentKind]) -> str:
        """A model segment's text as the model writes it after the segment ``before``: with the
        space that context lost (see ``space_to_model``)."""
        lost_space = self.tokenised(*before) != self.text(*before)
        if lost_space and not text[:1].isspace():
            return " " + text
        return text

    def encode_many(self, pieces: Sequence[tuple[str, SegmentKind]]) -> list[list[int]]:
        """Ids of many segments in one tokenizer call; raw prompts get BOS (when there is one)."""
        if not pieces:
            return []
        texts = [self.tokenised(text, kind) for text, kind in pieces]
        ids: list[list[int]] = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if self.chat is None and bos is not None:
            ids = [[bos, *i] if kind == "prompt" else i for i, (_, kind) in zip(ids, pieces, strict=True)]
        return ids

    def encode_records(
        self,
        records: Sequence[tuple[str, Sequence[tuple[SegmentKind, str]]]],
        trained: Collection[SegmentKind] = ("model",),
    ) -> list[tuple[list[int], list[int], list[int]]]:
        """Prompt ids, output ids and loss mask (1 on the tokens of ``trained`` kinds) of text-only records.

        ``records`` are (prompt, [(kind, text), ...]) pairs; all pieces go through one tokenizer
        call. The result is exactly what the agent loop builds for a policy of this tokenizer and
        format, given that the model wrote each model segment's text in its plain tokenisation.
        """
        pieces: list[tuple[str, SegmentKind]] = []
        for prompt, segments in records:
            pieces.append((prompt, "prompt"))
            for kind, text in segments:
                pieces.append((self.model_text(text, pieces[-1]) if kind in WRITTEN else text, kind))
        ids = iter(self.encode_many(pieces))
        out = []
        for _, segments in records:
            prompt_ids, output, mask = next(ids), [], []
            for kind, _ in segments:
                piece = next(ids)
                output.extend(piece)
                mask.extend([int(kind in trained)] * len(piece))
            out.append((prompt_ids, output, mask))
        return out


def _space_starts_words(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer writes a word's leading space into the word's token."""
    def ids(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return ids("> go") != ids("> ") + ids("go")


def drop_end_of_turn(
    gen: Generation, prompt_format: PromptFormat, decode: Callable[[Sequence[int]], str]
) -> Generation:
    """In chat format a sampled end-of-turn token ends the turn like a stop string: the next env
    segment's template text closes the turn, so the token is context, not model output."""
    if prompt_format != "chat" or gen.finish_reason != "eos" or not gen.token_ids:
        return gen
    ids = gen.token_ids[:-1]
    return replace(gen, text=decode(ids), token_ids=ids, logprobs=(gen.logprobs or [])[:-1])


class TokenizerIO:
    """``encode``/``decode`` of the Policy contract for backends that sample token ids with a HF
    tokenizer: set ``tokenizer`` and ``segments`` (its :class:`SegmentEncoder`)."""

    tokenizer: PreTrainedTokenizerBase
    segments: SegmentEncoder

    @property
    def tokenized(self) -> bool:
        return True

    @property
    def prompt_format(self) -> PromptFormat:
        return self.segments.format

    def encode(self, text: str, kind: SegmentKind) -> list[int]:
        return self.segments.encode(text, kind)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
