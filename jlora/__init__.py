"""jlora: parameter-efficient fine-tuning as transforms of JAX parameter pytrees.

Example:
  >>> import jax, jax.numpy as jnp, optax, jlora
  >>> params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
  >>> tree = jlora.wrap(params, {"**/kernel": jlora.LoRA(4)}, key=jax.random.key(0))
  >>> trainable, frozen = jlora.split(tree)
  >>> tx = jlora.optimizer(optax.adamw(1e-3))
  >>> opt_state = tx.init(trainable)
"""

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
from jlora._optim import optimizer as optimizer
from jlora._spec import Full as Full
from jlora._spec import LoRA as LoRA
from jlora._summary import Summary as Summary
from jlora._summary import summary as summary
from jlora._tree import Axes as Axes
from jlora._tree import FullWeight as FullWeight
from jlora._tree import LoraWeight as LoraWeight
from jlora._tree import adapted_leaves as adapted_leaves
from jlora._tree import combine as combine
from jlora._tree import merge as merge
from jlora._tree import split as split
from jlora._tree import trainable_mask as trainable_mask
from jlora._tree import unmerge as unmerge
from jlora._tree import wrap as wrap

__version__ = "0.1.0"

__all__ = [
    "Axes", "AxesError", "CheckpointError", "ConfigError", "DataError", "FetchError", "Full",
    "FullWeight", "JloraError", "LoRA", "LoraWeight", "ModelError", "RuleError", "ShardingError",
    "SpecError", "Summary", "TreeError", "adapted_leaves", "combine", "lora", "merge",
    "optimizer", "split", "summary", "trainable_mask", "unmerge", "wrap",
]
