"""Stage 2: preference-marker conditioning, tokenization with loss masks, and packing.

- `template`: Koala's chat template and markers, tokenization with a mask from character offsets.
- `packing`: examples into fixed-length rows with segment ids and restarting positions.
- `stage`: the stage run (`koala condition`), its outputs and statistics.
"""

from .packing import materialize, pack_plan, padding_fraction
from .template import Rendered, Template, load_tokenizer, template_for, tokenize

__all__ = ["Rendered", "Template", "load_tokenizer", "materialize", "pack_plan", "padding_fraction", "template_for", "tokenize"]
