"""The error raised for bad user input (configs, flags, dataset choices)."""


class ConfigError(ValueError):
    """Bad user input; the message is one line saying which field to change and how.

    The launchers print it without a traceback.
    """
