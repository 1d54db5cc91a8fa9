"""The exceptions melafast raises for problems a user can fix."""

__all__ = ["MelafastError", "DataError", "WeightsError", "RunError"]


class MelafastError(Exception):
    """Base class: a problem with the user's input, with a message that says what to do."""


class DataError(MelafastError):
    """A dataset folder, CSV or image that melafast cannot use as it is."""


class WeightsError(MelafastError):
    """Backbone weights that cannot be found, downloaded or loaded."""


class RunError(MelafastError):
    """A run folder (trained model) that is missing, incomplete or incompatible."""
