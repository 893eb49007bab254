"""Stage 4: KV-cache generation, request scheduling, the OpenAI-compatible server and chat page, the test sets and
the answers every compared model gives to them."""
