"""The reasoning side: DeepSeek-R1 chat format, fine-tuning data, the tiny local model, the engine.

- :mod:`.chat`: the R1-Distill chat template, rendering a prompt with the generation prompt, the
  think-block parser.
- :mod:`.data`: prompt/completion pairs from annotated experiences (quality filter, dedup, time split).
- :mod:`.tiny`: a tiny Llama with a tokenizer carrying the R1-Distill special tokens and template,
  built locally (tests, the CPU demo, the benchmark: nothing is downloaded).
- :mod:`.engine`: the Production ``nt8-reasoner`` (base + adapter) writing reflections.

Importing this package does nothing heavy (torch and transformers load inside functions).
"""
