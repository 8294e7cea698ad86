"""The one exception type users see: a one-line message that names the file or key and the fix."""


class GalaxyError(Exception):
    """A problem with the user's input (config, data file, checkpoint), reported without a traceback."""
