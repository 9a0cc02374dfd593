"""jlora: parameter-efficient fine-tuning as transforms of JAX parameter pytrees.

Example:
  >>> import jax, jax.numpy as jnp, optax, jlora
  >>> params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
  >>> tree = jlora.wrap(params, {"**/kernel": jlora.LoRA(4)}, key=jax.random.key(0))
  >>> trainable, frozen = jlora.split(tree)
  >>> tx = jlora.optimizer(optax.adamw(1e-3))
  >>> opt_state = tx.init(trainable)
"""

from jlora import _methods  # noqa: F401 - registers the adapter methods
from jlora._adapter import Adapter as Adapter
from jlora._adapter import AdapterSpec as AdapterSpec
from jlora._adapter import is_adapted as is_adapted
from jlora._checkpoint import fingerprint as fingerprint
from jlora._checkpoint import load_adapters as load_adapters
from jlora._checkpoint import read_adapter_manifest as read_adapter_manifest
from jlora._checkpoint import save_adapters as save_adapters
from jlora._errors import AxesError as AxesError
from jlora._errors import CheckpointError as CheckpointError
from jlora._errors import ConfigError as ConfigError
from jlora._errors import DataError as DataError
from jlora._errors import FetchError as FetchError
from jlora._errors import JloraError as JloraError
from jlora._errors import ModelError as ModelError
from jlora._errors import RuleError as RuleError
from jlora._errors import ShardingError as ShardingError
from jlora._errors import SpecError as SpecError
from jlora._errors import TreeError as TreeError
from jlora._lora import lora as lora
from jlora._methods.lora_init import LoraInitWeight as LoraInitWeight
from jlora._methods.adalora import AdaLoRA as AdaLoRA
from jlora._methods.adalora import AdaLoraWeight as AdaLoraWeight
from jlora._methods.adalora import RankAllocatorState as RankAllocatorState
from jlora._methods.adalora import apply_rank_pattern as apply_rank_pattern
from jlora._methods.adalora import budget_schedule as budget_schedule
from jlora._methods.adalora import orthogonal_penalty as orthogonal_penalty
from jlora._methods.adalora import rank_allocator as rank_allocator
from jlora._methods.dora import DoRA as DoRA
from jlora._methods.bottleneck import Bottleneck as Bottleneck
from jlora._methods.bottleneck import BottleneckWeight as BottleneckWeight
from jlora._methods.bottleneck import adapter_rules as adapter_rules
from jlora._methods.bottleneck import from_adapterhub as from_adapterhub
from jlora._methods.prompt import PromptTuning as PromptTuning
from jlora._methods.prompt import add_prompt as add_prompt
from jlora._methods.prompt import add_prefix as add_prefix
from jlora._methods.prompt import PrefixTuning as PrefixTuning
from jlora._methods.prompt import prepend_prompt as prepend_prompt
from jlora._methods.prompt import project_prefix as project_prefix
from jlora._methods.prompt import prepend_prefix as prepend_prefix
from jlora._methods.dora import DoraWeight as DoraWeight
from jlora._methods.ia3 import IA3 as IA3
from jlora._methods.ia3 import IA3Weight as IA3Weight
from jlora._methods.vera import VeRA as VeRA
from jlora._methods.vera import VeraWeight as VeraWeight
from jlora._methods.stacked import StackedLoRA as StackedLoRA
from jlora._methods.stacked import StackedLoraWeight as StackedLoraWeight
from jlora._multi import add_adapter as add_adapter
from jlora._multi import adapter_names as adapter_names
from jlora._multi import delete_adapter as delete_adapter
from jlora._multi import select_adapter as select_adapter
from jlora._multi import stack_adapters as stack_adapters
from jlora._multi import weighted_merge as weighted_merge
from jlora._rewrite import RewriteError as RewriteError
from jlora._quant import FP4 as FP4
from jlora._quant import NF4 as NF4
from jlora._quant import Int8 as Int8
from jlora._quant import Q4_0 as Q4_0
from jlora._quant import Q4_1 as Q4_1
from jlora._quant import Q8_0 as Q8_0
from jlora._quant import QuantizationError as QuantizationError
from jlora._quant import QuantizedArray as QuantizedArray
from jlora._quant import is_quantized as is_quantized
from jlora._quant import quantize as quantize
from jlora._manager import CheckpointManager as CheckpointManager
from jlora._manager import Restored as Restored
from jlora._optim import optimizer as optimizer
from jlora._peft import PeftMapping as PeftMapping
from jlora._peft import export_merged as export_merged
from jlora._peft import load_peft as load_peft
from jlora._peft import peft_mapping as peft_mapping
from jlora._peft import read_peft_config as read_peft_config
from jlora._peft import save_peft as save_peft
from jlora._spec import Full as Full
from jlora._spec import LoRA as LoRA
from jlora._summary import Summary as Summary
from jlora._summary import summary as summary
from jlora._adapter import Axes as Axes
from jlora._tree import FullWeight as FullWeight
from jlora._tree import LoraWeight as LoraWeight
from jlora._tree import adapted_leaves as adapted_leaves
from jlora._tree import combine as combine
from jlora._tree import merge as merge
from jlora._tree import split as split
from jlora._tree import trainable_mask as trainable_mask
from jlora._tree import unmerge as unmerge
from jlora._tree import wrap as wrap

from jlora import distributed as distributed
from jlora import sharding as sharding
from jlora.train_step import TrainState as TrainState
from jlora.train_step import TrainStep as TrainStep
from jlora.train_step import make_train_step as make_train_step

__version__ = "0.1.0"

__all__ = sorted([
    "AdaLoRA", "AdaLoraWeight", "RankAllocatorState", "apply_rank_pattern", "budget_schedule",
    "orthogonal_penalty", "rank_allocator", "PromptTuning", "add_prompt", "prepend_prompt",
    "PrefixTuning", "add_prefix", "project_prefix", "prepend_prefix",
    "Bottleneck", "BottleneckWeight", "adapter_rules", "from_adapterhub",
    "Adapter", "AdapterSpec", "Axes", "AxesError", "CheckpointError", "CheckpointManager",
    "ConfigError", "DataError", "DoRA", "DoraWeight", "FetchError", "Full", "FullWeight", "IA3",
    "IA3Weight", "JloraError", "LoRA", "LoraInitWeight", "LoraWeight", "ModelError", "PeftMapping",
    "Restored", "RewriteError", "RuleError", "VeRA", "VeraWeight", "NF4", "FP4", "Int8", "Q4_0", "Q4_1", "Q8_0",
    "QuantizationError", "QuantizedArray", "is_quantized", "quantize",
    "ShardingError", "SpecError", "Summary", "TrainState", "TrainStep", "TreeError",
    "adapted_leaves", "combine", "export_merged", "fingerprint", "is_adapted", "load_adapters",
    "load_peft", "lora", "make_train_step", "merge", "optimizer", "peft_mapping",
    "read_adapter_manifest", "read_peft_config", "save_adapters", "save_peft", "split", "summary",
    "trainable_mask", "unmerge", "wrap",
    "StackedLoRA", "StackedLoraWeight", "add_adapter", "adapter_names",
    "delete_adapter", "select_adapter", "stack_adapters", "weighted_merge",
])
