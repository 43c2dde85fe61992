"""Checkpoint conversion between Meta, llama2.c and Hugging Face formats.

Empty until the conversion work lands; llama_core loads Hugging Face checkpoints directly meanwhile.
"""
