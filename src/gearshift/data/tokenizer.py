"""A byte-level tokenizer that needs no files: one token per UTF-8 byte plus three specials.

It is a real ``transformers`` fast tokenizer, so it saves with ``save_pretrained`` and loads back
with ``AutoTokenizer.from_pretrained`` like any other.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from gearshift.errors import ModelError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

#: The byte-level tokenizer's chat template: ``role: content`` lines after BOS, each assistant
#: reply ending in EOS. The ``{% generation %}`` markers around the reply (and its EOS, so the
#: model learns to stop) are what ``apply_chat_template(..., return_assistant_tokens_mask=True)``
#: reads to mark assistant tokens. Bytes are tokens here, so the scaffolding is kept short.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- 'assistant: ' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['role'] + ': ' + message['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
)


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character map used by byte-level BPE tokenizers, so that
    # every byte (including whitespace and control bytes) is one visible vocabulary entry.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer (vocabulary: 256 bytes, then BOS, EOS, PAD).

    It carries :data:`CHAT_TEMPLATE`, saved with it, so ``apply_chat_template`` works on the
    tokenizer of any run's ``final/`` directory.

    Example:
        >>> tok = byte_level_tokenizer()
        >>> tok("hi")["input_ids"]
        [104, 105]
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    for i, special in enumerate((BOS, EOS, PAD)):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=1 << 30, chat_template=CHAT_TEMPLATE,
    )


def load_tokenizer(kind: str, model_path: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer for a run: byte-level, or the one saved in a local model directory (for a
    LoRA adapter directory: its own, else its base model's)."""
    if kind == "byte" or (kind == "auto" and model_path is None):
        return byte_level_tokenizer()
    if model_path is None:
        raise ModelError("model.tokenizer is 'auto' but model.path is not set; "
                         "set model.path or use model.tokenizer: byte")
    try:
        from gearshift.models import tokenizer_dir

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(Path(model_path))),
                                            local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load a tokenizer from {model_path}: {exc}. Save one there with "
            "tokenizer.save_pretrained(...), or set model.tokenizer: byte"
        ) from None
    if tok.eos_token_id is None:
        raise ModelError(f"the tokenizer in {model_path} has no EOS token; "
                         "documents cannot be separated when packing")
    return tok
