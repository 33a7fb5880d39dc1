"""The errors the launchers report in one line: bad user input, and a diverged run."""


class ConfigError(ValueError):
    """Bad user input; the message is one line saying which field to change and how.

    The launchers print it without a traceback and exit with code 2.
    """


class DivergenceError(FloatingPointError):
    """A run diverged: a non-finite or exploding value in the student's training, the
    teacher's update or the loss's parameters. The message is one line naming the
    quantity, the step and the config field to change; the launchers print it without a
    traceback and exit with code 1.
    """
