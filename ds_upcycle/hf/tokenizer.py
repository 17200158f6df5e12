"""A checkpoint's tokenizer in the form transformers loads (tokenizer.json and tokenizer_config.json).

A Hugging Face tokenizer (an imported model's) is copied as it is. A SentencePiece model is
converted by transformers from its model proto (normalizer, byte-fallback BPE, decoder), so both
encode text to the same ids, and the .model file ships beside it. Its start-of-text token is EOS:
training packs documents separated by EOS, so EOS is what conditions a document's first token
(and what lm-eval puts before an empty context), never the unused <s>.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from transformers import TokenizersBackend

from ..data.tokenizer import HF_CONFIG, SP_FILE, HFTokenizer, SentencePieceTokenizer, configured_token, load_tokenizer


def special_token_ids(tokenizer: Path) -> tuple[int, int]:
    """(start-of-text, end-of-text) ids: EOS for both with our SentencePiece models, the tokenizer's
    own BOS (if it names one) and EOS with a Hugging Face tokenizer."""
    loaded = load_tokenizer(tokenizer)
    if isinstance(loaded, HFTokenizer):
        bos = configured_token(loaded.path.parent / HF_CONFIG, "bos_token")
        bos_id = None if bos is None else loaded.tok.token_to_id(bos)
        return (loaded.eos_id if bos_id is None else bos_id), loaded.eos_id
    return loaded.eos_id, loaded.eos_id


def write_hf_tokenizer(tokenizer: Path, out_dir: Path) -> None:
    loaded = load_tokenizer(tokenizer)
    if isinstance(loaded, HFTokenizer):
        for file in loaded.files:
            shutil.copyfile(file, out_dir / file.name)
        return
    assert isinstance(loaded, SentencePieceTokenizer)
    eos, unk = loaded.sp.id_to_piece(loaded.eos_id), loaded.sp.id_to_piece(loaded.sp.unk_id())
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(loaded.path, Path(tmp) / SP_FILE)
        converted = TokenizersBackend.from_pretrained(tmp, bos_token=eos, eos_token=eos, unk_token=unk,
                                                      add_bos_token=False, add_eos_token=False)
    converted.save_pretrained(str(out_dir))
    shutil.copyfile(loaded.path, out_dir / SP_FILE)
