from django.urls import include, path
from rest_framework.routers import DefaultRouter

from portal.api import views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("workspaces", views.WorkspaceViewSet, basename="workspace")

urlpatterns = [
    # Before the router: its detail routes would not match this path, but keep the order obvious.
    path(
        "workspaces/<uuid:id>/logs/stream/",
        views.WorkspaceLogStreamView.as_view(),
        name="workspace-logs-stream",
    ),
    path("", include(router.urls)),
    path("teams/", views.TeamCreateView.as_view(), name="teams"),
    path("templates/", views.TemplateListView.as_view(), name="templates"),
    path("events/stream", views.EventStreamView.as_view(), name="events-stream"),
    path("registry/register", views.RegisterView.as_view(), name="registry-register"),
    path("registry/heartbeat", views.HeartbeatView.as_view(), name="registry-heartbeat"),
]
