"""Exceptions with one clear line each; the CLI prints ``str(err)`` and exits nonzero."""


class RotaqError(Exception):
    """Base class: a problem the user can act on."""


class LoadError(RotaqError):
    """The model could not be read (missing, corrupt, truncated, unsupported format)."""


class MatchError(RotaqError):
    """The graph does not have the structure a pass needs."""


class RewriteError(RotaqError):
    """A rewrite was refused (unsupported op or layer)."""


class VerificationError(RotaqError):
    """An exact rewrite changed the model's outputs beyond its tolerance."""


class MissingDependencyError(RotaqError):
    """An optional dependency is not installed."""
