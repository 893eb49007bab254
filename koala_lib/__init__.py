"""koala-kit: Koala (BAIR, 2023) reproduced in JAX/Flax; see the README and notebooks/."""

import os as _os

# The kit's models are JAX; transformers serves only tokenizers and chat templates here, which need no PyTorch. Its
# import-time advice "PyTorch was not found. Models won't be available ..." would mislead, so advisory warnings
# are off unless the user has set TRANSFORMERS_NO_ADVISORY_WARNINGS themselves.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
