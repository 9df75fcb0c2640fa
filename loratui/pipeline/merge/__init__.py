"""The merge step: the adapter folded into the unquantized base, written as a plain transformers directory."""
