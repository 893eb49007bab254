"""Stage 3: fine-tuning on a device mesh (optimizer, steps, data, budgets, the resumable loop)."""


class DoesNotFit(RuntimeError):
    """The memory estimate exceeds the device; the message says what to change."""
