"""User-facing errors: each says what is wrong, where, and how to fix it."""


class FineTuneError(Exception):
    """Base class for errors a user can act on (bad config, bad data, missing model)."""


class ConfigError(FineTuneError):
    """The run configuration is invalid. ``problems`` lists every offending key."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid {source} ({len(problems)} problem(s)):\n{lines}")


class DataError(FineTuneError):
    """The training data cannot be used as given."""


class ModelError(FineTuneError):
    """The base model cannot be found, downloaded or loaded."""


class HubError(FineTuneError):
    """Publishing to the Hugging Face hub failed in a way the user must fix."""
