"""The built-in tiny model: a byte-level BPE tokenizer trained on env text plus a small Llama.

It is what ``retroact init-model DIR`` writes, so the whole pipeline (expert -> IL -> RL -> eval)
runs on a CPU with no hub access. The directory is plain HF format: ``from_pretrained(DIR)``
loads both the model and the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
_WORDS = r"\n|> |'(?:s|t|re|ve|m|ll|d)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|[^\S\n]+(?!\S)|[^\S\n]+"
"""GPT-2's pre-split, except that "\\n" and "> " are always pieces of their own."""


class TinyModelConfig(BaseModel):
    """Sizes of the built-in model.

    The defaults (2 layers, 128 wide) train at about 17k tokens/s (forward + backward + AdamW,
    batch 8 x 450 tokens) on two idle CPU cores. Of the sizes tried on household IL they learned
    fastest per CPU second: 4 layers x 128 never learned to copy the task's object into the first
    thought within 600 steps where 2 layers x 128 did in 500 (docs/il.md has the figures). When
    other processes share the cores, use one torch thread: two threads then wait on each other.
    """

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(
        2048,
        ge=259,
        description="Largest BPE vocabulary (256 bytes + 3 specials + merges); small corpora give fewer.",
    )
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(352, ge=8, description="Width of the SwiGLU MLP.")
    max_positions: int = Field(4096, ge=2048, description="Longest context (RoPE, so free in parameters).")
    min_frequency: int = Field(2, ge=1, description="BPE merges need a pair seen at least this often.")
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, max_length: int = 4096
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (never an unknown token) that adds BOS by default, like Llama's.

    Every "\\n" and every "> " is cut out before BPE, so a step line tokenises the same whether
    the loop tokenises "... \\n> " and "go to desk 1\\n" apart or the whole text at once.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORDS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
        model_max_length=max_length,
    )


def build_tiny_model(
    out_dir: str | Path, texts: Iterable[str], config: TinyModelConfig | None = None
) -> Path:
    """Train the tokenizer on ``texts``, build a seeded random Llama, and save both to ``out_dir``."""
    config = config or TinyModelConfig()
    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, config.vocab_size, config.min_frequency, config.max_positions)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
