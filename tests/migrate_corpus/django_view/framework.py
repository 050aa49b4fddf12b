"""A tiny sync web framework, in the style of Django's URL routing."""

ROUTES = {}


def path(route, view):
    ROUTES[route] = view
    return route


def serve(requests):
    # The framework calls views without await, as Django does with a sync view.
    return [ROUTES[route]({"q": query}) for route, query in requests]
