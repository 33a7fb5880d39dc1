"""Methods: plug-ins behind one interface, looked up by name (`base.get`).

Each method module builds and registers its methods at import; importing it here is
the one line that makes a new method known to the driver, the launchers and
``python -m launch.methods``.
"""

# One line per method module (each registers its methods at import).
from l2t_jax.methods import (
    ce,  # noqa: F401
    distill,  # noqa: F401
    dlf,  # noqa: F401
    dln,  # noqa: F401
    federated,  # noqa: F401
    one,  # noqa: F401
    robust,  # noqa: F401
    transfer,  # noqa: F401
)
from l2t_jax.methods.base import (
    EvaluatedLoop,
    Method,
    OuterLoop,
    Phase,
    Plan,
    Schedule,
    get,
    names,
    register,
    validate,
)

__all__ = ["EvaluatedLoop", "Method", "OuterLoop", "Phase", "Plan", "Schedule", "get",
           "names", "register", "validate"]
