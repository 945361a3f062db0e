"""The one error type for bad data files and bad data content."""


class DataError(ValueError):
    """A data file or data content is unusable; the message names the file and the problem."""
