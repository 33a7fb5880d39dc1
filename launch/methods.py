r"""Lists the registered methods: name, config sections, example config, description.

  python -m launch.methods      (installed: l2t-methods)

Run one with `python -m launch.train --config=<example> --workdir=DIR`, or any config
with `--config.method=<name>` when it has the method's sections.
"""

from l2t_jax import methods
from launch import cli


def table() -> str:
    """One line per registered method, in columns."""
    rows = [(m.name, ",".join(m.sections) or "-", m.example, m.description)
            for m in map(methods.get, methods.names())]
    header = ("method", "sections", "example config", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3]
                     for r in [header, *rows])


def main(argv):
    del argv  # `cli.run` refuses extra arguments
    print(table())


def entry() -> None:
    """The ``l2t-methods`` command (``python -m launch.methods``)."""
    cli.run(main)


if __name__ == "__main__":
    entry()
