"""Third-party messages that read like a broken install but are not, filtered where loratui loads models.

bitsandbytes (imported by peft and transformers as soon as a LoRA model is built) looks for a fused
4-bit CPU kernel on CPUs with AVX512-BF16 and, when the optional ``kernels`` package is missing, logs
"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'" at import
time, on every start, even for plain LoRA on a full-precision base. ``kernels`` would download compiled
code from the Hugging Face Hub at run time, which an offline-first tool does not do; bitsandbytes'
own CPU 4-bit path works without it. Exactly that record is dropped; everything else bitsandbytes logs
(and every other logger) is left alone.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNELS_MESSAGE)


_FILTER = _DropKernelsHint()


def quiet_bitsandbytes() -> None:
    """Install the filter on bitsandbytes' CPU backend logger (idempotent). Call it before peft,
    transformers' quantizers or bitsandbytes are imported: the message is logged at import time."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
