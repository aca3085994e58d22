"""fedsec: a federated-learning security testbed for hospital consortia.

The one entry point is :func:`fedsec.run` (``fedsec run`` on the command line).
Importing this package has no side effects: Ray workers re-import it.
"""

__version__ = "0.1.0"


def run(scenario, overrides=None, out=None, verbose=False):
    """Run a scenario (a path, a dict or a loaded Scenario) and return its summary dict."""
    from fedsec.runner import run as _run

    return _run(scenario, overrides=overrides, out=out, verbose=verbose)


__all__ = ["run", "__version__"]
