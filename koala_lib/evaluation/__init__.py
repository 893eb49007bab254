"""Stage 5: leakage filter, pairwise judgments (raters, MTurk, an LLM judge) and their statistics."""
