"""jlora: parameter-efficient fine-tuning as transforms of JAX parameter pytrees."""

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

__version__ = "0.1.0"
