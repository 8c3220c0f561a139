"""leworld: JEPA world models trained from pixels with SIGReg, and planning with them."""


class LeworldError(Exception):
    """A problem the user can fix (bad path, bad override, corrupt file): the verbs print it as one
    line and exit non-zero instead of showing a traceback. Any exception with a true `user_error`
    attribute is treated the same way (envs.EnvError is one), so leworld needs no import of a
    package to recognise its errors."""

    user_error = True
