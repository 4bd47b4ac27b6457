"""The errors a user can cause, each reported as one line before any work starts (``helper.setup.cli_errors``).

Dependency-free, so the models, the methods, the data side and the engine raise the same classes without
importing one another."""


class UsageError(ValueError):
    """A flag value that cannot work; reported as one line before any work starts."""


class PairError(ValueError):
    """A method cannot serve a teacher/student pair (raised before any training)."""
