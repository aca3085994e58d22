"""fedsec: a federated-learning security testbed for hospital consortia.

The one entry point is :func:`fedsec.run` (``fedsec run`` on the command line).
Importing this package has no side effects: Ray workers re-import it.
"""

__version__ = "0.1.0"


def run(scenario, overrides=None, out=None, verbose=False, resume=None, progress=True, force=False):
    """Run a scenario (a path, a dict or a loaded Scenario) and return its summary dict.

    overrides: ``["federation.rounds=3", ...]`` or ``{"federation.rounds": 3}``.
    out: the results folder (default ``runs/<name>/<UTC time>-<hash>/``): new, empty or an
      earlier run's; force: also any other folder (nothing already there is touched).
    resume: the results folder of an interrupted run to finish.
    Raises ScenarioError for invalid input and RunFailed (``.summary``) if the run fails.
    """
    from fedsec.runner import run as _run

    return _run(scenario, overrides=overrides, out=out, verbose=verbose, resume=resume, progress=progress,
                force=force)


__all__ = ["run", "__version__"]
