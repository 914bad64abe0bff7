"""User errors: bad input that the user must fix. The CLI turns them into exit code 2 and one message."""


class UserError(Exception):
    """Bad config, data, checkpoint, path or environment. The message names the culprit and what to do."""

    exit_code = 2
