"""A real character-level tokenizer (``tokenizer.json``) shared by every zoo model.

BOS comes from the tokenizer's post-processor, not from the training loop: lm-eval encodes
prompts with the tokenizer's own special-token rules, so models must be trained on exactly
what ``tokenizer(text)`` produces.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from .skills import DIGITS, LETTERS

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
CHARS = list(" =\n") + list(DIGITS) + list(LETTERS)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    # BPE with no merges over single characters: every character is one token, and the whole
    # string (spaces included) is one pre-token, so context/continuation splits are exact.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=64,
    )
