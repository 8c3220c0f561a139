"""leworld: JEPA world models trained from pixels with SIGReg, and planning with them."""


class LeworldError(Exception):
    """A problem the user can fix (bad path, bad override, corrupt file): the verbs print it as one
    line and exit non-zero instead of showing a traceback."""
