"""The registry listener's URLconf (``PLATFORM_LISTENER=registry``): the agents' endpoints, and a
JSON 404 for every other path, so a workspace that reaches this port reaches nothing else of the
API, the admin or the docs."""

from django.urls import path

from portal.api import views

urlpatterns = [
    path("api/registry/register", views.RegisterView.as_view(), name="registry-register"),
    path("api/registry/heartbeat", views.HeartbeatView.as_view(), name="registry-heartbeat"),
]

handler404 = "portal.api.errors.json_404"
handler500 = "portal.api.errors.json_500"
