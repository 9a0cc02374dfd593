"""Adapter specs: what a rule asks for on the leaves it matches (re-exported from the methods)."""

from jlora._methods.lora import INITS as INITS
from jlora._methods.lora import Full as Full
from jlora._methods.lora import LoRA as LoRA

__all__ = ["LoRA", "Full", "INITS"]
