"""Hugging Face decoders on lsts attention (``attn_implementation="lsts"``).

`attention` plugs lsts into ``transformers.AttentionInterface``; importing this package registers it.
"""

from lsts.models.hf.attention import (
    DECODE_UNIT,
    NAME,
    attention_modules,
    lsts_attention_forward,
    register,
    use_lsts_attention,
)

__all__ = ["DECODE_UNIT", "NAME", "attention_modules", "lsts_attention_forward", "register", "use_lsts_attention"]
from lsts.models.hf.sequence_parallel import (
    SequenceParallel,
    SequenceParallelLoader,
    sequence_parallel,
)

__all__ += ["SequenceParallel", "SequenceParallelLoader", "sequence_parallel"]
