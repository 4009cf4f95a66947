"""Data: byte tokenizer, text corpora (bundled KJV or local files), synthetic memory tasks, resumable loading.

Torch-free at import; the loaders import torch and datasets when called.
"""
