from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from portal.api import proxy_views, views

urlpatterns = [
    path("", include("portal.web.urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/", include("portal.api.urls")),
    # Workspace access through the proxy (workspaces/access.py).
    path("api/proxy/auth", proxy_views.ProxyAuthView.as_view(), name="proxy-auth"),
    path("workspaces/<uuid:workspace_id>/open", proxy_views.open_workspace, name="workspace-open"),
    path("_platform/session", proxy_views.workspace_session, name="workspace-session"),
    # The login page browsers are sent to (LOGIN_URL).
    path("api-auth/", include("rest_framework.urls")),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
]

# JSON in the API's shape on the API's paths, Django's pages elsewhere (portal.api.errors).
handler400 = "portal.api.errors.bad_request"
handler403 = "portal.api.errors.permission_denied"
handler404 = "portal.api.errors.json_404"
handler500 = "portal.api.errors.json_500"
