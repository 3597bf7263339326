"""``stepdiff serve``: a live studio in the browser (Starlette on uvicorn, history in SQLite).

Its dependencies (starlette, uvicorn, websockets) are stepdiff's own: the base install serves. The engine
(``Studio``) is plain Python and threads; the HTTP layer (``create_app``) only maps requests onto it.
"""

from .jobs import GuidancePlan, JobNotFound, QueueFull, Studio, WrongState
from .spec import FieldError, JobSpec, Limits, PreviewSpec, parse_job

__all__ = ["FieldError", "GuidancePlan", "JobNotFound", "JobSpec", "Limits", "PreviewSpec", "QueueFull", "Studio",
           "WrongState", "create_app", "parse_job"]


def create_app(studio: Studio, **kwargs):
    from .app import create_app as make

    return make(studio, **kwargs)
