"""Errors a user can cause. The CLI prints them in one line and exits with code 2."""


class FedloraError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(FedloraError):
    """The experiment config is malformed or inconsistent."""


class DataError(FedloraError):
    """The data cannot be used as configured."""


class BudgetExhausted(FedloraError):
    """Training would spend past a client's privacy target."""


class Refused(FedloraError):
    """A client refused a request from the server (weaker privacy, past its budget, keys it must not take or give)."""


class ClientsFailed(FedloraError):
    """Too few clients of a round succeeded, after every retry."""
