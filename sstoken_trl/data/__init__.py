"""Data stage: samples (template text, messages, prompt/completion) to prompt and response spans; the collator."""
