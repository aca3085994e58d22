"""The one exception type users see: it names the file / key that is wrong."""


class FedsecError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` and exits with code 2 (no traceback)."""


class ScenarioError(FedsecError):
    """A scenario that cannot be loaded or is invalid: names the file and the key path."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = file, key, message
        where = []
        if file:
            where.append(str(file))
        if key:
            where.append(f"key '{key}'")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class DataError(FedsecError):
    """A data file or folder that is missing or malformed: names the path and what was expected."""
