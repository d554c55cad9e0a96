"""The trainer's default tokenizer: character level, built in code, nothing to download.

`default_tokenizer()` returns a `transformers.PreTrainedTokenizerFast` over a fixed vocabulary:

- special tokens `<pad>` (id 0), `<s>` (BOS, 1), `</s>` (EOS, 2), `<unk>` (3), and the chat role markers
  `<|system|>`, `<|user|>`, `<|assistant|>` (4-6);
- one token per character of printable ASCII, tab and newline (7-103);
- byte-fallback tokens `<0x00>` ... `<0xFF>` (104-359) for every other character, so any UTF-8 text round-trips
  through `encode` / `decode` exactly (`<unk>` is never produced).

Encoding a string prepends BOS (as Llama-style tokenizers do) and appends nothing; the trainer appends EOS to
completions. The chat template renders `<s>` once, then each message as `<|role|>` + content + `</s>`, and the
generation prompt as `<|assistant|>`; a role other than system / user / assistant is an error in the template.
The tokenizer survives `save_pretrained` and `AutoTokenizer.from_pretrained` (it is a plain `tokenizer.json`).
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_ROLES = ("system", "user", "assistant")
CHARACTERS = ("\t", "\n") + tuple(chr(code) for code in range(32, 127))
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ ': expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def default_vocabulary() -> dict[str, int]:
    """Token -> id: special tokens, role markers, characters, byte-fallback tokens, in that order."""
    tokens = SPECIAL_TOKENS + ROLE_TOKENS + CHARACTERS + BYTE_TOKENS
    return {token: index for index, token in enumerate(tokens)}


def default_tokenizer():
    """A fresh character-level `PreTrainedTokenizerFast` (360 tokens) with BOS/EOS/PAD/UNK and a chat template."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = default_vocabulary()
    # A BPE model without merges is a character tokenizer; byte_fallback spells unknown characters in bytes.
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.add_special_tokens(list(SPECIAL_TOKENS + ROLE_TOKENS))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocabulary["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )
