"""The web dashboard: spend, tenants, reliability, cache, interactions and evaluations.

Static pages (``static/``, vanilla JS with hand-made SVG charts, nothing from a CDN) and the
JSON endpoints they call, mounted on the app by :func:`add_dashboard_routes`.
"""

from loadbear.dashboard.routes import add_dashboard_routes
from loadbear.dashboard.scope import View, Viewer, resolve_view, resolve_viewer

__all__ = ["add_dashboard_routes", "View", "Viewer", "resolve_view", "resolve_viewer"]
