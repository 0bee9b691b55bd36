"""The views that serve the OpenAPI schema and the Swagger page. Kept apart from config.schema:
that module is the API's schema class, loaded while DRF itself is, before any view can be."""

from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.renderers import JSONRenderer


class _JsonErrors:
    """Errors as JSON like the rest of the API, not in the view's own format (YAML, an HTML page
    whose template needs data an error does not carry)."""

    def handle_exception(self, exc):
        response = super().handle_exception(exc)
        self.request.accepted_renderer, self.request.accepted_media_type = JSONRenderer(), "application/json"
        return response


class SchemaView(_JsonErrors, SpectacularAPIView):
    pass


class SwaggerDocsView(_JsonErrors, SpectacularSwaggerView):
    # DRF's OPTIONS answer is metadata, which the Swagger page's HTML renderer cannot render (a 500).
    http_method_names = ["get", "head"]
