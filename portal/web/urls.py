from django.urls import path

from portal.web import views

app_name = "dashboard"

urlpatterns = [
    path("", views.index, name="index"),
    path("w/<uuid:workspace_id>/", views.workspace_page, name="workspace"),
    path("w/<uuid:workspace_id>/remove/", views.remove, name="remove"),
    path(
        "w/<uuid:workspace_id>/<str:verb>/",
        views.lifecycle,
        name="lifecycle",
    ),
]
