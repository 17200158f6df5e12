"""Data: text sources, tokenizers (SentencePiece or Hugging Face), cached token files and packed batches.

- config: DataConfig, the settings (imports nothing heavy);
- prepare: `prepare_data(DataConfig)` -> PreparedData, the cached token files;
- loader: PackedSequences, BatchOrder, validation_batches (torch);
- sources, synthetic, tokenizer: where text comes from and how it becomes tokens.
"""
