"""Errors the store raises with messages a user can act on."""


class StoreError(Exception):
    """Base class for store errors."""


class DatabaseConfigError(StoreError):
    """The database URL is malformed or names an engine we do not support."""


class DatabaseUnavailableError(StoreError):
    """The database could not be reached (server down, wrong host, bad credentials)."""


class NotFoundError(StoreError):
    """A named row (version, run, alias, message) does not exist."""


class InvalidStateError(StoreError):
    """An operation is not allowed in the row's current state (e.g. promoting a rejected version)."""
