"""Data: the dataset registry, record formats, the prompt template, loading and tokenising, batching."""
