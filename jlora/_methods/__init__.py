"""The registered adapter methods (importing this package registers them)."""

from jlora._methods.lora import Full as Full
from jlora._methods.lora import FullWeight as FullWeight
from jlora._methods.lora import LoRA as LoRA
from jlora._methods.lora import LoraWeight as LoraWeight
from jlora._methods.lora_init import LoraInitWeight as LoraInitWeight
from jlora._methods.dora import DoRA as DoRA
from jlora._methods.dora import DoraWeight as DoraWeight
from jlora._methods.ia3 import IA3 as IA3
from jlora._methods.ia3 import IA3Weight as IA3Weight
from jlora._methods.vera import VeRA as VeRA
from jlora._methods.vera import VeraWeight as VeraWeight
from jlora._methods.stacked import StackedLoRA as StackedLoRA
from jlora._methods.stacked import StackedLoraWeight as StackedLoraWeight
from jlora._methods.adalora import AdaLoRA as AdaLoRA
from jlora._methods.adalora import AdaLoraWeight as AdaLoraWeight
from jlora._methods.bottleneck import Bottleneck as Bottleneck
from jlora._methods.bottleneck import BottleneckWeight as BottleneckWeight
from jlora._methods.prompt import PromptTuning as PromptTuning
from jlora._methods.prompt import PrefixTuning as PrefixTuning
