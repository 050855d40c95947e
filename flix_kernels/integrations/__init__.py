"""Interoperability with other libraries (PEFT)."""
