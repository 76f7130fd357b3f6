"""The embedded web server: the visitors' display (/display) and the engineer's dashboard (/)."""

from controller.web.app import WebService

__all__ = ["WebService"]
