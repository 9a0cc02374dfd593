"""Errors raised by jlora.

Every error jlora raises on bad input is a :class:`JloraError` subclass whose
message names what is wrong (the path, the shape, the file) and what to do.
"""


class JloraError(Exception):
  """Base class of every error jlora raises on bad input."""


class RuleError(JloraError, ValueError):
  """A rule is malformed or matches nothing."""


class SpecError(JloraError, ValueError):
  """An adapter spec is impossible for the leaf it targets (rank, alpha, dtype)."""


class AxesError(JloraError, ValueError):
  """A kernel's stacked / input / output axes are invalid or cannot be inferred."""


class TreeError(JloraError, ValueError):
  """Two trees do not fit together, or a tree is in the wrong state."""


class CheckpointError(JloraError, OSError):
  """A checkpoint or adapter file is missing, corrupt or for another base."""


class ModelError(JloraError, ValueError):
  """A model checkpoint, config or file is missing, corrupt or unsupported."""


class FetchError(JloraError, OSError):
  """A packaged resource could not be fetched or failed its checksum."""


class ShardingError(JloraError, ValueError):
  """A sharding spec or mesh does not fit the tree."""


class DataError(JloraError, ValueError):
  """A dataset is empty, lacks a column, or holds out-of-range labels."""


class ConfigError(JloraError, ValueError):
  """A configuration has an unknown key or an invalid value."""
