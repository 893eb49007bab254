"""Base models for Koala: the embedded default (SmolLM2-135M-Instruct) and its conversion to Hugging Face format."""
