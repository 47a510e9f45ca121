"""Text <-> token ids for real checkpoints, through the ``tokenizers`` package.

Two sources:

* a Hugging Face ``tokenizer.json`` (:meth:`Tokenizer.from_file`): the checkpoint's own
  normalizer, pre-tokenizer, model, post-processor (BOS) and decoder, exactly as transformers'
  fast tokenizers use them;
* a GGUF file's embedded vocabulary (:meth:`Tokenizer.from_gguf_vocab`) when it is a byte-level
  BPE (``tokenizer.ggml.model == "gpt2"``: ``tokenizer.ggml.tokens`` + ``tokenizer.ggml.merges``),
  rebuilt as a ``tokenizers`` BPE with a byte-level pre-tokenizer/decoder. The split regex follows
  ``tokenizer.ggml.pre`` for the kinds listed in :data:`PRE_TOKENIZER_REGEX` (the expressions of
  llama.cpp's ``llama_vocab`` for those kinds); any other kind gets GPT-2's regex, which can split
  some digit runs and contractions differently from llama.cpp.

Errors are :class:`fusec.models.config.ModelError` (a ``FusecError``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from .config import ModelError

# Split expressions of llama.cpp's BPE pre-tokenizers (llama-vocab.cpp), by ``tokenizer.ggml.pre``.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_REGEX = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "smaug-bpe": _LLAMA3_REGEX,
                       "qwen2": _QWEN2_REGEX}

GGUF_TOKEN_TYPE_CONTROL = 3  # llama.cpp LLAMA_TOKEN_TYPE_CONTROL
GGUF_TOKEN_TYPE_USER_DEFINED = 4


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ModelError("text prompts need the 'tokenizers' package: pip install 'fusec[models]' "
                         "(or pass --prompt-ids)") from None
    return tokenizers


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the model's BOS/EOS conventions.

    Args:
        tk: the wrapped ``tokenizers.Tokenizer``.
        eos_ids: token ids that end generation (``eos_token_id`` of the config / GGUF).
        bos_id: the BOS id, prepended by :meth:`encode` when ``add_bos`` and the tokenizer's own
            post-processor did not already put it first.
        add_bos: whether prompts start with BOS (``tokenizer.ggml.add_bos_token`` for GGUF; for a
            ``tokenizer.json`` its post-processor decides, so ``False``).
    """

    def __init__(self, tk, *, eos_ids: Iterable[int] = (), bos_id: int | None = None, add_bos: bool = False):
        self.tk = tk
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.bos_id = bos_id
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return int(self.tk.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_file(cls, path: str | Path, *, eos_ids: Iterable[int] = ()) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json``; raises :class:`ModelError` if it cannot be parsed."""
        tokenizers = _require_tokenizers()
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise ModelError(f"cannot load tokenizer {str(path)!r}: {e}") from None
        return cls(tk, eos_ids=eos_ids)

    @classmethod
    def from_gguf_vocab(cls, tokens: Sequence[str], merges: Sequence[str], *, token_types: Sequence[int] = (),
                        pre: str | None = None, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                        add_bos: bool = False) -> Tokenizer:
        """A byte-level BPE from a GGUF vocabulary (``tokenizer.ggml.model == "gpt2"``).

        ``tokens[i]`` is the byte-level string of id ``i``; ``merges`` are ``"left right"`` pairs in
        rank order; tokens whose ``token_types`` entry is CONTROL (3) or USER_DEFINED (4) become
        added tokens (matched whole in the text, never split). Raises :class:`ModelError` for a
        malformed merge.
        """
        tokenizers = _require_tokenizers()
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for m in merges:
            parts = m.split(" ")
            if len(parts) != 2:
                raise ModelError(f"GGUF tokenizer.ggml.merges: malformed merge {m!r} (expected 'left right')")
            pairs.append((parts[0], parts[1]))
        tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        regex = PRE_TOKENIZER_REGEX.get(pre or "")
        if regex is None:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        tk.decoder = decoders.ByteLevel()
        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, tt in enumerate(token_types) if tt in (GGUF_TOKEN_TYPE_CONTROL, GGUF_TOKEN_TYPE_USER_DEFINED)]
        if special:
            tk.add_special_tokens(special)
        return cls(tk, eos_ids=eos_ids, bos_id=bos_id, add_bos=add_bos)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (with the tokenizer's special tokens, BOS where the model uses it)."""
        ids = list(self.tk.encode(text, add_special_tokens=True).ids)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, int(self.bos_id))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream(self) -> TextStream:
        """A :class:`TextStream` for printing a generation token by token."""
        return TextStream(self)


class TextStream:
    """Incremental detokenization: :meth:`push` returns the new text a token adds.

    Decodes the whole generated sequence each time and returns the suffix not yet returned, so
    byte-level tokens that complete a multi-byte character (and tokenizers whose decoders depend
    on the neighbours, such as SentencePiece's leading-space rule) print correctly; text ending in
    an incomplete UTF-8 sequence (U+FFFD) is held back until it completes.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text to print now (possibly empty)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        out = text[self.emitted:]
        self.emitted = len(text)
        return out
