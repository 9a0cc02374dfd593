"""The registered adapter methods (importing this package registers them)."""

from jlora._methods.lora import Full as Full
from jlora._methods.lora import FullWeight as FullWeight
from jlora._methods.lora import LoRA as LoRA
from jlora._methods.lora import LoraWeight as LoraWeight
from jlora._methods.ia3 import IA3 as IA3, IA3Weight as IA3Weight
